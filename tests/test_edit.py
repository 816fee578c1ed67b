"""``python -m tract_repro.edit`` (img2img and inpainting with a distilled SD student) on the tiny latent chain of
tests/test_latent_chain.py: strength 1 is the plain K-step sample, strength n/K starts at grid index n·T/K, zero
steps and an all-black mask give the VAE's latent exactly, the known region is the image's latent exactly, output i
depends on seed i alone, and every refusal is one line with exit status 2 and nothing written."""
import io
import types

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_latent_chain import chain  # noqa: F401 (the module fixture: encode, v fine-tune, TRACT)
from tract_repro import edit
from tract_repro.common.errors import ConfigError

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

PROMPT = "a giant cat sits on the mat"
K = 4


@pytest.fixture(scope="module")
def editor(chain):  # noqa: F811
    return edit.load_editor(chain.student, K)


@pytest.fixture(scope="module")
def image(chain):  # noqa: F811
    return chain.tmp / "images" / "0000.png"  # 20 × 24 (W × H): centre-cropped to 20 × 20, resized to 16 × 16


def _encoded(chain, image):  # noqa: F811
    """z = E(x) by the encoding's own VAE, x prepared as the encoder prepares images: (1, C, h, w) float64."""
    from tract_repro.data.latent_models import Encoders
    from tract_repro.data.latent_sources import prepare

    x = torch.from_numpy(prepare(image.read_bytes(), 16))[None]
    return Encoders(chain.folder).latents(x, [0]).double()


def _prompt_cond(chain, n):  # noqa: F811
    from tract_repro.data.latent_models import Encoders
    from tract_repro.networks.conditioning import Cond

    return Cond(torch.zeros(n, dtype=torch.long), {"text": Encoders(chain.folder).text([PROMPT]).expand(n, -1, -1)})


def test_strength_one_is_the_plain_k_step_sample_from_the_same_noise(chain, image, tmp_path):  # noqa: F811
    from tract_repro.evaluation.runs import load_run
    from tract_repro.sampling import registry
    from tract_repro.sampling.samplers import noise_from_seeds

    seeds = [0, 1]
    out = tmp_path / "grid.png"
    latents, written = edit.img2img(chain.student, image, PROMPT, 1.0, K, out, seeds=seeds)
    run = load_run(chain.student, with_data=False)
    for i, seed in enumerate(seeds):  # each seed is sampled alone
        plain = registry.sample("ddim", run.denoiser, run.grid, K, noise_from_seeds([seed], chain.data.shape),
                                _prompt_cond(chain, 1), seeds=[seed], clip=False)
        assert torch.equal(latents[i:i + 1], plain)
    grid = Image.open(written)
    assert written == out and grid.width == 3 * (8 * 16 + 4) + 4  # input + 2 outputs, each 16 px × 8, 4 px apart


def test_strength_n_over_k_starts_at_grid_index_n_t_over_k(chain, editor, image):  # noqa: F811
    """One step (n = 1): the start is α·z + σ·ε at grid index T/K, and one DDIM step goes to index 0."""
    from tract_repro.sampling.samplers import noise_from_seeds

    assert edit.strength_steps(1 / K, K) == 1 and edit.strength_steps(0.5, K) == 2 and edit.strength_steps(1, K) == K
    z, cond, grid = _encoded(chain, image), editor.cond(PROMPT, 1), editor.run.grid
    out = editor.img2img(z, cond, [3], 1 / K)
    t = torch.tensor([grid.T // K])
    lam_t, alpha_t, sigma_t = grid.at(t)
    lam_0, alpha_0, sigma_0 = grid.at(torch.tensor([0]))
    x_t = alpha_t * z + sigma_t * noise_from_seeds([3], chain.data.shape)
    x_hat = editor.denoiser(x_t, lam_t, cond)
    torch.testing.assert_close(out, alpha_0 * x_hat + sigma_0 * (x_t - alpha_t * x_hat) / sigma_t, rtol=1e-12, atol=1e-12)


def test_zero_remaining_steps_return_the_image_latent_and_small_strength_stays_near_it(chain, editor, image):  # noqa: F811
    z, cond = _encoded(chain, image), editor.cond(PROMPT, 2)
    assert edit.strength_steps(0.1, K) == 0
    assert torch.equal(editor.img2img(z, cond, [0, 1], 0.1), z.expand(2, -1, -1, -1))  # no step: E(x) itself
    near = (editor.img2img(z, cond, [0, 1], 1 / K) - z).square().mean()
    far = (editor.img2img(z, cond, [0, 1], 1.0) - z).square().mean()
    print(f"mean square distance to E(x): strength 1/K {near:.4g}, strength 1 {far:.4g}")
    assert near < far


def _mask(path, size=(20, 24), left_columns=10):
    """A W × H mask, white (regenerate) in the first ``left_columns`` columns."""
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    array[:, :left_columns] = 255
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def test_inpainting_keeps_the_known_region_exactly(chain, editor, image, tmp_path):  # noqa: F811
    z, cond = _encoded(chain, image), editor.cond(PROMPT, 2)
    black = editor.latent_mask(_mask(tmp_path / "black.png", left_columns=0), image)
    assert not black.any()
    assert torch.equal(editor.inpaint(z, black, cond, [0, 1]), z.expand(2, -1, -1, -1))  # nothing to regenerate

    regenerate = editor.latent_mask(_mask(tmp_path / "left.png"), image)  # 10 of 20 columns → 8 of 16 → 4 of 8
    expected = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    expected[..., :4] = True
    assert torch.equal(regenerate, expected)
    out = editor.inpaint(z, regenerate, cond, [0, 1])
    known = ~regenerate.expand_as(out)
    assert torch.equal(out[known], z.expand_as(out)[known])
    assert not torch.allclose(out[~known], z.expand_as(out)[~known])  # the masked region was regenerated

    latents, written = edit.inpaint(chain.student, image, tmp_path / "left.png", PROMPT, K, tmp_path / "in.png",
                                    seeds=[0, 1])
    assert torch.equal(latents, out) and Image.open(written).width == 3 * (8 * 16 + 4) + 4


def test_output_i_depends_on_seed_i_alone(chain, editor, image, tmp_path):  # noqa: F811
    z = _encoded(chain, image)
    regenerate = editor.latent_mask(_mask(tmp_path / "left.png"), image)
    batch = editor.img2img(z, editor.cond(PROMPT, 3), [5, 6, 7], 0.5)
    alone = editor.img2img(z, editor.cond(PROMPT, 1), [7], 0.5)
    assert torch.equal(batch[2:], alone)
    batch = editor.inpaint(z, regenerate, editor.cond(PROMPT, 3), [5, 6, 7])
    alone = editor.inpaint(z, regenerate, editor.cond(PROMPT, 1), [6])
    assert torch.equal(batch[1:2], alone)
    assert torch.equal(editor.data.decode(batch[1:2]), editor.data.decode(alone))  # the same output image


def _refused(capsys, argv, match):
    assert edit.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and match in err, err
    return err


def test_every_refusal_is_one_line_and_writes_nothing(chain, image, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out.png"
    base = [str(chain.student), "--image", str(image), "--prompt", PROMPT, "--steps", str(K), "--out", str(out)]
    img = ["img2img", *base]
    _refused(capsys, [*img, "--strength", "0"], "--strength 0 is not in (0, 1]")
    _refused(capsys, [*img, "--strength", "1.5"], "--strength 1.5 is not in (0, 1]")
    _refused(capsys, ["img2img", str(tmp_path / "nowhere"), *base[1:], "--strength", "0.5"], "is not a run directory")
    not_run = tmp_path / "folder"
    not_run.mkdir()
    _refused(capsys, ["img2img", str(not_run), *base[1:], "--strength", "0.5"], "is not a finished run")
    _refused(capsys, [*img, "--strength", "0.5", "--steps", "3"], "3 sampling steps do not divide T")
    _refused(capsys, [*img, "--strength", "0.5", "--w", "1"], "takes no guidance weight")
    _refused(capsys, ["img2img", *base[:2], str(tmp_path / "none.png"), *base[3:], "--strength", "0.5"], "not found")
    bigger = _mask(tmp_path / "big.png", size=(24, 24))
    _refused(capsys, ["inpaint", *base, "--mask", str(bigger)], "is 24x24 but --image")
    assert not out.exists()
    out.write_bytes(b"keep")
    _refused(capsys, [*img, "--strength", "0.5"], "exists: remove it or choose another file")
    _refused(capsys, ["inpaint", *base, "--mask", str(_mask(tmp_path / "m.png"))], "exists")
    assert out.read_bytes() == b"keep"
    for data, what in ((None, "is not a latent text-to-image run"),
                       (types.SimpleNamespace(encoded=True, text=False, folder=tmp_path), "holds no caption")):
        with pytest.raises(ConfigError, match=what):
            edit.check_latent_text_run(types.SimpleNamespace(path=tmp_path, data=data))


def test_the_command_writes_one_grid_and_a_guided_run_takes_w(chain, image, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "edit.png"
    assert edit.main(["img2img", str(chain.student), "--image", str(image), "--prompt", PROMPT, "--strength", "0.5",
                      "--steps", str(K), "--seeds", "0", "1", "2", "--out", str(out)]) == 0
    assert Image.open(out).width == 4 * (8 * 16 + 4) + 4 and f"wrote {out}" in capsys.readouterr().out
    guided = tmp_path / "guided.png"  # the v teacher was trained with caption dropout: guided by x̂^w
    assert edit.main(["inpaint", str(chain.teacher), "--image", str(image), "--mask", str(_mask(tmp_path / "m.png")),
                      "--prompt", PROMPT, "--steps", str(K), "--w", "2", "--seeds", "0", "--out", str(guided)]) == 0
    assert guided.is_file()
