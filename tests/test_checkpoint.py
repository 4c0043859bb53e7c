from __future__ import annotations

import pickle

import pytest
import torch

from busiseg.checkpoint import CheckpointError, load_model
from busiseg.models.net import MultiTaskUnet

MODEL_CFG = {
    "_target_": "busiseg.models.net.MultiTaskUnet",
    "encoder_name": "resnet18",
    "encoder_weights": None,
    "in_channels": 1,
    "decoder_channels": [16, 16, 8, 8, 8],
}


def _ckpt(tmp_path, extra=None, model_cfg=MODEL_CFG):
    net = MultiTaskUnet(**{k: v for k, v in model_cfg.items() if k != "_target_"})
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.01)
    ckpt = {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "hyper_parameters": {"config": {"model": model_cfg}}}
    if extra:
        ckpt.update(extra)
    path = tmp_path / "m.ckpt"
    torch.save(ckpt, path)
    return net.eval(), path


# {}: a checkpoint from before model.arch and model.class_pooling
@pytest.mark.parametrize("extra", [{}, {"arch": "unet"}, {"arch": "unetplusplus"},
                                   {"arch": "unet", "class_pooling": "lesion"}])
def test_round_trip_same_outputs(tmp_path, extra):
    net, path = _ckpt(tmp_path, model_cfg={**MODEL_CFG, **extra})
    loaded, config = load_model(path)
    assert loaded.unet.__class__ is net.unet.__class__
    assert loaded.class_pooling == net.class_pooling == extra.get("class_pooling", "avg")
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        for a, b in zip(net(x), loaded(x)):
            torch.testing.assert_close(a, b)
    assert config["model"]["encoder_name"] == "resnet18"


class Evil:
    def __reduce__(self):
        return (print, ("this ran at load time",))


def test_pickled_object_refused(tmp_path):
    _, path = _ckpt(tmp_path, {"payload": Evil()})
    with pytest.raises(CheckpointError, match=r"refused: .*\(Unsupported global: GLOBAL print was not an "
                                              r"allowed global by default\)$"):
        load_model(path)


@pytest.mark.parametrize("content", [
    b"hello, not a checkpoint\n",  # a text file: torch's unpickler fails with a KeyError
    bytes(range(7, 250)),  # bytes that are no pickle: an UnpicklingError, but nothing was refused
    pickle.dumps({"a": 1})[:-3],  # a cut-off file
])
def test_a_file_that_is_no_checkpoint_is_one_error_not_a_refusal(tmp_path, content):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_model(bad)
    msg = str(info.value)
    assert msg.startswith(f"{bad}: not a readable PyTorch checkpoint (damaged, or another kind of file: ")
    assert "refused" not in msg and "\n" not in msg


def test_missing_and_garbage_files_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        load_model(bad)


def test_a_run_folder_given_for_its_checkpoint_names_the_checkpoints_in_it(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"run: a folder, not a checkpoint: pass a \.ckpt file \(none in it or "
                                              r"in its checkpoints/ folder\)$"):
        load_model(run)
    for name in ("last.ckpt", "epoch_028.ckpt"):
        (run / "checkpoints" / name).write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        load_model(run)
    assert str(info.value) == (f"{run}: a folder, not a checkpoint: pass a .ckpt file (in it: "
                               f"{run}/checkpoints/epoch_028.ckpt, {run}/checkpoints/last.ckpt)")


@pytest.mark.parametrize("state, key", [({"format": "busiseg.mask_refiner/1"}, "mask_refiner"),
                                        ({"format": "busiseg.crop_classifier/1", "classes": ["benign", "malignant"]},
                                         "crop_classifier"),
                                        ({"format": "busiseg.crop_classifier/1",
                                          "classes": ["normal", "benign", "malignant"]}, "scan_classifier")])
def test_a_second_stage_file_given_as_the_network_says_where_it_goes(tmp_path, state, key):
    path = tmp_path / f"{key}.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"pass it as {key}=, and the run's checkpoints/last.ckpt as "
                                              r"ckpt_path=\)$"):
        load_model(path)
