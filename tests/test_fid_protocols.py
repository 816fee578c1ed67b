"""FID protocols by name: each one's features equal a direct computation by its reference code's definition
(the official TRACT code's pytorch-fid path, clean-fid's clean mode, EDM's fid.py), on tiny images the tests
generate and randomly initialised Inception networks written in the real file formats."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tract_repro.evaluation import fid, frechet, inception, protocols, references, sources
from tract_repro.evaluation.inception import inception_extractor
from tract_repro.results import tables


@pytest.fixture(scope="module")
def pytorch_fid_weights(tmp_path_factory):
    """pytorch-fid's FID Inception, randomly initialised (seeded), saved as its .pth state dict is."""
    from cleanfid import inception_pytorch

    built = {}
    original_url, original_load = inception_pytorch.load_state_dict_from_url, torch.nn.Module.load_state_dict
    torch.manual_seed(0)
    try:  # build the network with its random initialisation and keep it instead of loading weights into it
        inception_pytorch.load_state_dict_from_url = lambda *a, **k: {}
        torch.nn.Module.load_state_dict = lambda self, state, *a, **k: built.setdefault("net", self)
        inception_pytorch.fid_inception_v3()
    finally:
        torch.nn.Module.load_state_dict = original_load
        inception_pytorch.load_state_dict_from_url = original_url
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in built["net"].state_dict().items()}  # BN statistics away from their identity defaults
    path = tmp_path_factory.mktemp("hub") / sources.PYTORCH_FID_NAME
    torch.save(state, path)
    return path


class FakeTorchScriptInception(torch.nn.Module):
    """clean-fid's TorchScript interface: ``layers`` on [−1, 1]-ish 299² input; forward resizes inside (uint8 scale)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 2048))
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128) / 128)
        return features if return_features else self.output(features)


@pytest.fixture(scope="module")
def torchscript_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchscript")
    torch.jit.script(FakeTorchScriptInception()).save(str(folder / sources.TORCHSCRIPT_NAME))
    return folder


def images(n=4, size=32, seed=3):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_each_protocol_quantises_as_its_reference_code():
    """tract: round(127.5·(x + 1)) clipped (ml-tract's FID code); edm: (x·127.5 + 128).clip(0, 255).to(uint8)
    (EDM's generate.py, truncating); they differ exactly at the half-way points."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(4000, generator=g, dtype=torch.float64) * 2.4 - 1.2,
                   (torch.arange(-2, 258, dtype=torch.float64) - 127.5) / 127.5,  # integers of 127.5·(x + 1)
                   (torch.arange(0, 256, dtype=torch.float64) - 127) / 127.5]).view(-1, 1, 1, 1)  # half-way points
    tract = np.clip(np.round(127.5 * (x.numpy() + 1)), 0, 255).astype(np.uint8)
    edm = (x.numpy() * 127.5 + 128).clip(0, 255).astype(np.uint8)
    assert np.array_equal(protocols.get("tract").quantise(x).numpy(), tract)
    assert np.array_equal(protocols.get("clean").quantise(x).numpy(), tract)
    assert np.array_equal(protocols.get("edm").quantise(x).numpy(), edm)
    assert (tract != edm).any()  # a quantiser a protocol got wrong would show


def test_tract_protocol_is_the_official_pytorch_fid_path(pytorch_fid_weights):
    """tract: uint8 → x/127.5 − 1 → bilinear 299 (align_corners=False) → pytorch-fid's Inception, no normalisation,
    as ml-tract's FID code computes it; the same features as clean-fid's legacy_pytorch path (resize outside)."""
    from cleanfid import inception_pytorch
    from cleanfid.resize import build_resizer

    from tract_repro.evaluation.inception import pytorch_fid_network

    batch = images()
    extractor = inception_extractor("tract", str(pytorch_fid_weights.parent))
    ours = inception.ImageFeatures(extractor, "tract", workers=1)(batch)
    direct_net = pytorch_fid_network(pytorch_fid_weights)
    with torch.no_grad():
        x = F.interpolate(batch.float() / 127.5 - 1, size=(299, 299), mode="bilinear", align_corners=False)
        direct = direct_net(x)[0].flatten(1).numpy()
    assert ours.shape == (4, 2048) and np.allclose(ours, direct, rtol=1e-5, atol=1e-5)
    # the Inception Score's class probabilities: softmax(pool features · fcᵀ), the file's own 1008-class layer
    logits = direct.astype(np.float64) @ torch.load(pytorch_fid_weights, weights_only=True)["fc.weight"].double().numpy().T
    p = extractor.probabilities(direct)
    assert np.allclose(p, np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
    # clean-fid's legacy_pytorch: its own resizer on the uint8 HWC array, then [0, 1] → normalised inside the network
    original = inception_pytorch.load_state_dict_from_url
    inception_pytorch.load_state_dict_from_url = lambda *a, **k: torch.load(pytorch_fid_weights, weights_only=True)
    try:
        legacy = inception_pytorch.InceptionV3(output_blocks=[3], resize_input=False, normalize_input=True).eval()
    finally:
        inception_pytorch.load_state_dict_from_url = original
    resize = build_resizer("legacy_pytorch")
    resized = np.stack([resize(a) for a in batch.permute(0, 2, 3, 1).numpy()]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        cleanfid_legacy = legacy(torch.from_numpy(resized).float() / 255)[0].flatten(1).numpy()
    assert np.allclose(ours, cleanfid_legacy, rtol=1e-4, atol=1e-4)
    assert frechet.frechet_distance(frechet.statistics(np.concatenate([ours, ours[:2] + 1e-3])),
                                    frechet.statistics(np.concatenate([direct, direct[:2] + 1e-3]))) < 1e-3


@pytest.mark.filterwarnings("ignore::FutureWarning")  # clean-fid's Inception is TorchScript
def test_clean_and_edm_protocols_feed_the_torchscript_inception_as_their_codes_do(torchscript_folder):
    """clean: PIL bicubic resize of each float channel to 299, clipped to [0, 255], then (x − 128)/128 → layers
    (clean-fid's clean mode);
    edm: the uint8 image straight into the network, which resizes inside (EDM's detector, return_features=True)."""
    net = torch.jit.load(str(torchscript_folder / sources.TORCHSCRIPT_NAME)).eval()
    batch = images(3)
    clean = inception.ImageFeatures(inception_extractor("clean", str(torchscript_folder)), "clean", workers=1)(batch)
    resized = np.stack([np.stack([np.asarray(Image.fromarray(channel.astype(np.float32), mode="F")
                                              .resize((299, 299), resample=Image.BICUBIC)) for channel in image])
                        for image in batch.numpy()]).clip(0, 255)
    with torch.no_grad():
        direct_clean = net.layers((torch.from_numpy(resized).float() - 128) / 128).numpy()
        direct_edm = net(batch.float(), return_features=True).numpy()
    edm = inception.ImageFeatures(inception_extractor("edm", str(torchscript_folder)), "edm", workers=1)(batch)
    assert np.allclose(clean, direct_clean, rtol=1e-5, atol=1e-5)
    assert np.allclose(edm, direct_edm, rtol=1e-6, atol=1e-6)
    assert not np.allclose(clean, edm, atol=1e-3)  # the two resizes do differ
    probabilities = inception_extractor("edm", str(torchscript_folder)).probabilities(edm)
    assert probabilities.shape == (3, 1008) and np.allclose(probabilities.sum(1), 1)


def test_each_protocol_reads_its_own_weights_file(tmp_path):
    """paper.inception is a folder holding both files; a file of the other kind points at its folder."""
    assert sources.inception_file("tract", tmp_path) == tmp_path / sources.PYTORCH_FID_NAME
    assert sources.inception_file("edm", tmp_path) == sources.inception_file("clean", tmp_path) == \
        tmp_path / sources.TORCHSCRIPT_NAME
    assert sources.inception_file("tract", tmp_path / "inception-2015-12-05.pt") == tmp_path / sources.PYTORCH_FID_NAME
    assert sources.inception_file("tract", tmp_path / "mine.pth") == tmp_path / "mine.pth"
    assert sources.missing_cleanfid_stats("tract") in (None, sources.missing_cleanfid_stats("tract"))
    assert "cifar10_legacy_pytorch_train_32.npz" in (sources.missing_cleanfid_stats("tract") or
                                                     sources.cleanfid_stats_name(mode="legacy_pytorch"))
    with pytest.raises(ValueError, match="choose one of tract, clean, edm"):
        protocols.get("legacy_pytorch")


def test_edm_headline_is_the_best_seed_range_and_the_tables_say_so(tmp_path):
    """EDM reports the minimum of its three FIDs; the others the mean; both keep mean ± std and the minimum."""
    fids = [3.1, 2.9, 3.3]
    assert protocols.get("edm").headline(fids) == 2.9 and protocols.get("tract").headline(fids) == pytest.approx(3.1)
    edm = dict(fid=fids, fid_mean=3.1, fid_std=0.2, fid_min=2.9, protocol="edm")
    tract = dict(edm, protocol="tract")
    assert tables._fmt_paper(edm) == "2.90 best, 3.10 ± 0.20 (edm)"
    assert tables._fmt_paper(tract) == "3.10 ± 0.20 (tract)"


def test_published_statistics_are_imported_with_their_protocol(tmp_path, capsys):
    """`reference cifar10 --protocol edm --source file --file cifar10-32x32.npz` (EDM's fid-refs format: mu, sigma);
    a file without them, or a missing one, is refused in one line and nothing is written."""
    g = np.random.default_rng(0)
    a = g.normal(size=(8, 8))
    np.savez(tmp_path / "cifar10-32x32.npz", mu=g.normal(size=8), sigma=a @ a.T)
    out = tmp_path / "ref.npz"
    assert fid.main(["reference", "cifar10", "--protocol", "edm", "--source", "file", "--file",
                     str(tmp_path / "cifar10-32x32.npz"), "--out", str(out)]) == 0
    (mu, sigma), meta = references.load_reference(out)
    assert np.array_equal(sigma, a @ a.T) and meta["protocol"] == "edm" and meta["shape"] == [3, 32, 32]
    assert meta["source_sha256"] == fid.sha256(tmp_path / "cifar10-32x32.npz")
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    for bad in ("bad.npz", "nowhere.npz"):
        assert fid.main(["reference", "cifar10", "--protocol", "edm", "--source", "file", "--file", str(tmp_path / bad),
                         "--out", str(tmp_path / "x.npz")]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "x.npz").exists()
    assert fid.main(["reference", "cifar10", "--source", "file", "--out", str(tmp_path / "x.npz")]) == 2
    assert "--file" in capsys.readouterr().err


def test_statistics_and_results_of_clean_fid_modes_read_as_their_protocols(tmp_path):
    """Reference statistics written before protocols had names (clean-fid ``mode``) still say how they were made."""
    references.save_reference(tmp_path / "old.npz", np.zeros(3), np.eye(3), mode="legacy_pytorch", dataset="cifar10-train")
    assert protocols.of_metadata(references.load_reference(tmp_path / "old.npz")[1]).name == "tract"
    assert protocols.of_metadata(dict(mode="legacy_tensorflow")).name == "edm"
    assert protocols.of_metadata(json.loads(json.dumps(dict(protocol=protocols.get("clean").record())))).name == "clean"
