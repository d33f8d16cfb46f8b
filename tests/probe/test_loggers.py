"""Routing summaries in TensorBoard event files and an offline W&B run, live from the probe and from the store."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moescope.analysis.store import AnalysisStore as Store
from moescope.probe import attach
from moescope.probe.loggers import export_tensorboard, heatmap_image, log_to

STEPS, LAYERS, EXPERTS = 4, 2, 4


def _tiny_model():
    from moescope.kernels import MoEConfig, ModelConfig, MoETransformer

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=LAYERS, num_heads=2, ffn_size=64, max_seq_len=16,
                      moe=MoEConfig(num_experts=EXPERTS, top_k=2, score="softmax", capacity_factor=1.0), backend="torch")
    return MoETransformer.from_config(cfg, seed=0)


def _train(store: Store, run: str, writer, **log_options):
    """A few real training steps of the reference MoE with the probe recording into `store` and logging to `writer`."""
    torch.manual_seed(0)
    model = _tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with attach(model, sink=f"local:{store.root}", run=run) as probe:
        logger = log_to(probe, writer, **log_options)
        for step in range(STEPS):
            probe.set_step(step)
            ids = torch.randint(0, 64, (4, 16))
            model(ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step == 1:
                logger.flush()  # mid-run flush: steps 0-1 written now, the rest as frames arrive and at detach
    return logger


def _events(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    return acc


def _expected(store: Store, run: str) -> dict[str, dict[int, float]]:
    """The analysis library's per-step values, keyed like the logged tags."""
    out: dict[str, dict[int, float]] = {}
    for metric, column, name in (("maxvio", "maxvio", "maxvio"), ("drop_rate", "drop_rate", "drop_rate"),
                                 ("entropy", "mean", "entropy_mean")):
        df = store.metric(metric, run, by="step")
        for row in df.itertuples(index=False):
            out.setdefault(f"moescope/{name}/layer_{row.layer}", {})[int(row.step)] = float(getattr(row, column))
    return out


def test_live_tensorboard_scalars_equal_the_analysis_library_and_carry_heatmap_and_histograms(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    store = Store(tmp_path / "store")
    writer = SummaryWriter(str(tmp_path / "tb"))
    logger = _train(store, "tb-run", writer, image_every=2)
    writer.close()
    assert logger.logged_steps == list(range(STEPS))
    acc = _events(tmp_path / "tb")
    expected = _expected(store, "tb-run")
    for tag, by_step in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got == pytest.approx(by_step), tag
    tags = acc.Tags()
    assert {f"moescope/entropy/layer_{layer}" for layer in range(LAYERS)} <= set(tags["histograms"])
    first = acc.Histograms("moescope/entropy/layer_0")[0]
    tokens = store.sql("SELECT count(*) AS n FROM token_stats WHERE step = 0 AND layer = 0", run="tb-run").n.iloc[0]
    assert first.step == 0 and first.histogram_value.num == tokens
    images = acc.Images("moescope/load_share")
    assert [i.step for i in images] == [0, 2]
    assert (images[0].height, images[0].width) == (LAYERS * 8, EXPERTS * 8)
    store.close()


def test_export_writes_the_same_tags_from_the_store(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    store = Store(tmp_path / "store")
    writer = SummaryWriter(str(tmp_path / "live"))
    _train(store, "ex-run", writer)
    writer.close()
    assert export_tensorboard(store, "ex-run", tmp_path / "after", image_every=3) == STEPS
    live, after = _events(tmp_path / "live"), _events(tmp_path / "after")
    assert set(after.Tags()["scalars"]) == set(live.Tags()["scalars"])
    for tag in live.Tags()["scalars"]:
        assert [(e.step, e.value) for e in after.Scalars(tag)] == pytest.approx([(e.step, e.value) for e in live.Scalars(tag)])
    assert [i.step for i in after.Images("moescope/load_share")] == [0, 3]
    store.close()


def test_offline_wandb_run_holds_the_scalars_and_the_heatmap(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    store = Store(tmp_path / "store")
    run = wandb.init(project="moescope-test", dir=str(tmp_path), mode="offline")
    _train(store, "wb-run", run, image_every=2)
    run_dir = Path(run.dir).parent
    run.finish()
    wandb.teardown()  # stops wandb's service process, which writes the transaction log
    history = _wandb_history(run_dir)
    assert [h["_step"] for h in history] == list(range(STEPS))
    for tag, by_step in _expected(store, "wb-run").items():
        assert [h[tag] for h in history] == pytest.approx([by_step[s] for s in range(STEPS)]), tag
    pictured = [h["_step"] for h in history if "moescope/load_share" in h]
    assert pictured == [0, 2] and history[0]["moescope/load_share"]["_type"] == "image-file"
    for h in history:
        assert h["moescope/entropy/layer_0"]["_type"] == "histogram"
    for step in pictured:
        png = run_dir / "files" / history[step]["moescope/load_share"]["path"]
        assert png.read_bytes().startswith(b"\x89PNG")
    store.close()


def _wandb_history(run_dir: Path) -> list[dict]:
    """History rows of the run's transaction log (.wandb), read back as wandb's protobuf Records.

    The file is a 7-byte header (":W&B", magic, version) then LevelDB-log records in 32 KiB
    blocks: 4-byte checksum, 2-byte little-endian length, 1-byte type (1 full, 2 first,
    3 middle, 4 last); a block tail shorter than a record header is padding.
    """
    from wandb.proto import wandb_internal_pb2

    [log] = run_dir.glob("*.wandb")
    data, block, pos, rows, pending = log.read_bytes(), 32 * 1024, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                row: dict = {}
                for item in record.history.item:  # nested_key is a path into nested values (a histogram's "values")
                    *outer, last = [item.key] if item.key else list(item.nested_key)
                    node = row
                    for key in outer:
                        node = node.setdefault(key, {})
                    node[last] = json.loads(item.value_json)
                rows.append({"_step": record.history.step.num, **row})
    return rows


def test_heatmap_scale_is_fixed_from_zero_to_twice_uniform():
    share_LE = np.array([[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    img = heatmap_image(share_LE)
    assert img.shape == (16, 32, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == (68, 1, 84) and tuple(img[0, 8]) == (253, 231, 37)  # 0 and >= 2/E at the ends
    assert len({tuple(img[8, 8 * e]) for e in range(4)}) == 1


def test_the_probe_sink_keeps_working_with_a_logger(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    model = _tiny_model()
    writer = SummaryWriter(str(tmp_path / "tb"))
    with attach(model, sink="memory", run="m") as probe:
        logger = log_to(probe, writer)
        ids = torch.randint(0, 64, (2, 16))
        model(ids, attention_mask=torch.ones_like(ids))
        tables = probe.tables()  # still the memory sink's tables
        logger.flush()
    writer.close()
    assert tables["routing"].num_rows == 2 * 16 * LAYERS * 2 and logger.logged_steps == [0]


def test_an_unknown_writer_is_a_clear_error(tmp_path):
    model = _tiny_model()
    with attach(model, sink="memory", run="w") as probe:
        with pytest.raises(ValueError, match="SummaryWriter or a wandb run"):
            log_to(probe, object())


def test_cli_export_tensorboard_writes_event_files(tmp_path, capsys):
    import importlib.util

    from moescope.cli import main

    # The synthetic recorded run of tests/dashboard/conftest.py, loaded by path under a name of its own.
    spec = importlib.util.spec_from_file_location("dashboard_recorded_run", Path(__file__).parents[1] / "dashboard" / "conftest.py")
    recorded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recorded)
    RUN, RECORDED_STEPS = recorded.RUN, recorded.STEPS
    recorded.fill_store(Store(tmp_path / "store")).close()
    assert main(["export", RUN, "--tensorboard", str(tmp_path / "cli"), "--store", str(tmp_path / "store")]) == 0
    assert f"{RECORDED_STEPS} steps" in capsys.readouterr().out
    acc = _events(tmp_path / "cli")
    assert [e.step for e in acc.Scalars("moescope/maxvio/layer_0")] == list(range(RECORDED_STEPS))
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "nope", "--tensorboard", str(tmp_path / "x"), "--store", str(tmp_path / "store")])
    assert exit_info.value.code == 2 and "unknown run 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["export", RUN, "--store", str(tmp_path / "store")])
    assert exit_info.value.code == 2 and "--tensorboard" in capsys.readouterr().err
