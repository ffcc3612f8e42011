"""Read TensorBoard event files back (tests only): TFRecord framing, CRCs checked."""

from __future__ import annotations

import struct

from etils import epath


def read_events(data: bytes) -> list:
    """Every `Event` proto in the bytes of one event file."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto import event_pb2

    def masked(b):
        c = crc32c(b)
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    events, i = [], 0
    while i < len(data):
        header = data[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[i + 8:i + 12])[0] == masked(header)
        body = data[i + 12:i + 12 + n]
        assert struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] == masked(body)
        events.append(event_pb2.Event.FromString(body))
        i += 16 + n
    return events


def read_run(tb_dir) -> list:
    """The events of every event file in `tb_dir` (local or gs://), in file order."""
    files = sorted(epath.Path(tb_dir).glob("events.out.tfevents.*"))
    assert files, f"no event file in {tb_dir}"
    return [e for f in files for e in read_events(f.read_bytes())]


def scalars(events) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the scalar summaries."""
    out: dict[str, list] = {}
    for e in events:
        for v in e.summary.value:
            if v.WhichOneof("value") == "simple_value":
                out.setdefault(v.tag, []).append((e.step, v.simple_value))
    return out


def texts(events) -> dict[str, list[tuple[int, str]]]:
    """{tag: [(step, text), ...]} of the text summaries (tensorboardX's add_text)."""
    out: dict[str, list] = {}
    for e in events:
        for v in e.summary.value:
            if v.metadata.plugin_data.plugin_name == "text":
                text = b"".join(v.tensor.string_val).decode()
                out.setdefault(v.tag.split("/text_summary")[0], []).append((e.step, text))
    return out


def hparams(events) -> dict:
    """{name: value} of the HParams session-start summary, if any."""
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    for e in events:
        for v in e.summary.value:
            if v.metadata.plugin_data.plugin_name == "hparams":
                data = HParamsPluginData.FromString(v.metadata.plugin_data.content)
                if data.HasField("session_start_info"):
                    return {k: getattr(p, p.WhichOneof("kind"))
                            for k, p in data.session_start_info.hparams.items()}
    return {}
