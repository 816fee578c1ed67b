"""The latent Table 1 (`make digits-latent`): its DVC stages (VAE → latents → latent teacher → students) and
the reconstruction floor in the rendered table."""
from pathlib import Path

import pandas as pd
import yaml

from tract_repro.results import pipeline, tables

ROOT = Path(__file__).resolve().parents[1]


def test_the_latent_teacher_waits_for_the_vae_and_the_latents(monkeypatch):
    monkeypatch.chdir(ROOT)
    stages = pipeline.load_stages()
    assert stages["digits_vae"]["deps"][-1] == "runs/digits/classifier" and stages["digits_vae"]["outs"] == ["runs/digits/vae"]
    assert "--model runs/digits/vae" in stages["digits_latents"]["cmd"] and stages["digits_latents"]["outs"] == ["data/latent_digits"]
    assert "data/latent_digits" in stages["digits_latent_teacher"]["deps"]
    assert "gin/digits/latent.gin" in stages["digits_latent_teacher"]["deps"]
    latent = [v for k, v in stages.items() if k.startswith(("digits_run_latent_tract_", "digits_run_latent_btd_"))]
    assert latent and all("TEACHER = 'runs/digits/latent_teacher'" in v["cmd"] for v in latent)
    assert not [d for d in stages["digits_table1"]["deps"] if "latent" in d]  # pixel Table 1 does not wait for the VAE


def test_a_latent_table_shows_the_reconstruction_floor_beside_the_noise_floor():
    table = yaml.safe_load((ROOT / "experiments" / "table1_latent.yaml").read_text())
    assert all(r["paper"]["value"] is None for r in table["rows"])
    scores = pd.DataFrame([dict(row=r, seed=s, nfe=1, digits_fd=10.0 + i, fidelity_rmse=0.1, noise_floor=2.9,
                                samples=500, reconstruction_floor=2.67)
                           for s in (0, 1, 2) for i, r in enumerate(["tract_1step", "btd_1step"])])
    summary = tables.summarise(scores)
    summary.attrs.update(noise_floor=2.9, samples=500, reconstruction_floor=2.67)
    text = tables.render(table, summary, tables.check_orderings(table, summary))
    assert "noise floor (two halves of the real set): 2.90; reconstruction floor" in text and ": 2.67;" in text
