"""Probe-set replays: exactly the set's tokens, tagged with it, through a model or checkpoint files."""
import numpy as np
import pytest
import torch

from moescope.cli import main
from moescope.collector.store import UnknownProbeSet
from moescope.analysis.store import AnalysisStore as Store
from moescope.kernels import MoEConfig, ModelConfig, MoETransformer
from moescope.probe import attach
from moescope.probe.replay import ReplayError, replay, save_reference_checkpoint
from moescope.probe_sets import ProbeSet

CFG = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=2, ffn_size=64, max_seq_len=128,
                  moe=MoEConfig(num_experts=4, top_k=2, score="softmax"))


@pytest.fixture
def model():
    return MoETransformer.from_config(CFG, seed=1)


@pytest.fixture
def probe_set(store):
    ps = ProbeSet.from_corpus(seq_len=24, sequences_per_domain=2)
    store.register_probe_set("small", ps)
    return ps


def test_replay_records_exactly_the_probe_set_tokens_tagged_with_it(store, model, probe_set):
    model.train()
    done = replay(model, store, "small", run="r", checkpoint="c0", step=7, batch_size=3)
    assert done == {"checkpoint": "c0", "step": 7, "sequences": 8, "tokens": probe_set.tokens, "layers": 2}
    assert model.training  # restored
    stats = store.sql("SELECT * FROM token_stats ORDER BY layer, seq, pos", run="r")
    assert set(stats.probe_set) == {"small"} and set(stats.phase) == {"eval"} and set(stats.step) == {7}
    expected_ids = np.concatenate(probe_set.sequences)
    expected_seq = np.concatenate([np.full(s.size, i) for i, s in enumerate(probe_set.sequences)])
    expected_pos = np.concatenate([np.arange(s.size) for s in probe_set.sequences])
    for layer in (0, 1):
        g = stats[stats.layer == layer]
        assert (g.token_id.to_numpy() == expected_ids).all()
        assert (g.seq.to_numpy() == expected_seq).all() and (g.pos.to_numpy() == expected_pos).all()
        assert g.domain.tolist() == [probe_set.domains[i] for i in expected_seq]
    routing = store.sql("SELECT layer, count(*) AS n FROM routing WHERE probe_set = 'small' GROUP BY layer", run="r")
    assert routing.n.tolist() == [probe_set.tokens * 2] * 2
    assert store.checkpoints("r")[["checkpoint", "step"]].values.tolist() == [["c0", 7]]


def test_replay_routing_is_what_the_model_routes_and_outputs_stay_bit_identical(model, probe_set):
    ids_NS, mask_NS, domains = probe_set.to_tensors()
    model.eval()
    with torch.no_grad():
        plain = model(ids_NS, attention_mask=mask_NS).logits
        with attach(model, sink="memory", run="m") as probe:
            probe.set_probe_set("small", 0)
            tagged = model(ids_NS, attention_mask=mask_NS).logits
            model(ids_NS[:2], attention_mask=mask_NS[:2])  # the tag applies to one forward only
            tables = probe.tables()
    assert torch.equal(plain, tagged)
    routing = tables["routing"].to_pandas()
    first, second = routing[routing.microbatch == 0], routing[routing.microbatch == 1]
    assert set(first.probe_set) == {"small"} and second.probe_set.isna().all()
    assert second.seq.max() == 1


def test_set_probe_set_numbers_sequences_from_the_given_index(model):
    ids_BS = torch.randint(1, 255, (2, 5))
    with attach(model, sink="memory", run="m") as probe:
        probe.set_probe_set("p", 40)
        model(ids_BS)
        routing = probe.tables()["routing"].to_pandas()
    assert sorted(set(routing.seq)) == [40, 41]
    with attach(model, sink="memory", run="m") as probe:
        for bad, msg in [("../x", "invalid probe set name"), ("ok", "first_sequence must be an int >= 0")]:
            with pytest.raises(ValueError, match=msg):
                probe.set_probe_set(bad, -1 if bad == "ok" else 0)


def test_replay_refuses_a_second_replay_an_unknown_set_and_an_unknown_step(store, model, probe_set):
    replay(model, store, "small", run="r", checkpoint="c0", step=0)
    with pytest.raises(ReplayError, match="checkpoint 'c0' of run 'r' is already replayed through probe set 'small'"):
        replay(model, store, "small", run="r", checkpoint="c0", step=0)
    with pytest.raises(UnknownProbeSet, match="unknown probe set 'other'; registered probe sets: small"):
        replay(model, store, "other", run="r", checkpoint="c1", step=1)
    with pytest.raises(ReplayError, match="the step of checkpoint 'c9' is unknown in run 'r': pass step="):
        replay(model, store, "small", run="r", checkpoint="c9")
    store.add_checkpoint("r", "c5", 5)
    assert replay(model, store, "small", run="r", checkpoint="c5")["step"] == 5
    short = MoETransformer.from_config(ModelConfig(**{**CFG.__dict__, "max_seq_len": 16}))
    with pytest.raises(ReplayError, match="probe set 'small' has sequences of 24 tokens; the model takes at most 16"):
        replay(short, store, "small", run="r", checkpoint="c6", step=6)
    assert "c6" not in set(store.checkpoints("r").checkpoint)  # refused before anything was recorded


def _permuted(model: MoETransformer, perm: torch.Tensor) -> MoETransformer:
    """The same model with each MoE layer's experts renumbered: new expert j is old expert perm[j]."""
    other = MoETransformer.from_config(CFG, seed=0)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for block in other.moe_blocks():
            for t in (block.router.weight_ED, block.router.bias_E, block.w_gate_EDF, block.w_up_EDF, block.w_down_EFD):
                t.copy_(t[perm])
    return other


def test_two_model_versions_align_experts_that_do_not_share_ids(store, model, probe_set):
    perm = torch.tensor([2, 0, 3, 1])
    replay(model, store, "small", run="v1", checkpoint="final", step=100)
    replay(_permuted(model, perm), store, "small", run="v2", checkpoint="final", step=100)
    al = store.metric("alignment", run="v1", run_b="v2")
    inverse = torch.argsort(perm).tolist()  # old expert i is new expert inverse[i]
    for layer, g in al.groupby("layer"):
        assert g.expert_b.tolist() == inverse, layer
    assert np.allclose(al.agreement, 1.0) and (al.tokens == probe_set.tokens).all()


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`moescope ARGS` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(result, fragment):
    code, _, err = result
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]


def test_cli_replays_reference_checkpoint_files_in_order(tmp_path, model, capsys):
    root = tmp_path / "store"
    paths = []
    for step in (0, 50):
        paths.append(save_reference_checkpoint(model, tmp_path / f"step-{step}.pt", step))
    args = ["--store", str(root), "--run", "cli", "--probe-set", "corpus"]
    code, out, err = run_cli(capsys, "replay", *args, "--from-corpus", "--checkpoint", str(paths[0]),
                             "--checkpoint", str(paths[1]))
    assert code == 0, err
    assert "through cli/step-0 (step 0)" in out and "through cli/step-50 (step 50)" in out
    store = Store(root)
    try:
        sat = store.metric("saturation", run="cli")
        assert sat.checkpoint.unique().tolist() == ["step-0", "step-50"] and np.allclose(sat.saturation, 1.0)
    finally:
        store.close()
    _one_line_error(run_cli(capsys, "replay", *args, "--checkpoint", str(paths[0])), "already replayed")
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    _one_line_error(run_cli(capsys, "replay", *args[:2], "--probe-set", "corpus", "--run", "x", "--checkpoint", str(bare)),
                    "holds no model config (a bare state_dict?)")
    _one_line_error(run_cli(capsys, "replay", "--store", str(root), "--run", "x", "--probe-set", "nope", "--checkpoint",
                            str(paths[0])), "unknown probe set 'nope'; registered probe sets: corpus")
    _one_line_error(run_cli(capsys, "replay", *args, "--checkpoint", str(tmp_path / "missing.pt")), "does not exist")
    short = MoETransformer.from_config(ModelConfig(**{**CFG.__dict__, "max_seq_len": 64}))
    save_reference_checkpoint(short, tmp_path / "short.pt", 3)
    _one_line_error(run_cli(capsys, "replay", *args, "--checkpoint", str(tmp_path / "short.pt")),
                    "probe set 'corpus' has sequences of 128 tokens; the model takes at most 64")
