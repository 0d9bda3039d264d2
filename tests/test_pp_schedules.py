"""Pipeline schedules (parallel.pp_schedules, on torch.distributed.pipelining): bubbles and activation
memory against their closed forms, V3 Table 2 for 1F1B, ZB1P and DualPipe(V).

Two levels. torch's op order for every schedule, simulated with the costs (no processes, exact), must
give the closed-form bubble and in-flight activations for p = 2, 4, 8. Then 4 gloo ranks run
1F1B, ZB1P and DualPipeV on synthetic stages that sleep F, I and W (benchmarks/pp_schedules.py), and
the measured bubble fraction and peak resident memory must match the same closed forms."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import pp_schedules as bench  # noqa: E402  (spawned ranks import it by name, so it must be on sys.path)

# per chunk and micro-batch; F = I = 2W as in the benchmark (see bench.Costs), 1.5x its 100 ms so that
# torch's ~1 ms per op between ops stays a few % of the bubbles even on a loaded machine
COSTS = bench.Costs(F=0.15, I=0.15, W=0.075)
PP, M = 4, 8
MEASURED = ["1f1b", "zb1p", "dualpipev"]


# -- torch's op order, simulated: exact ---------------------------------------------------------------
@pytest.mark.parametrize("pp", [2, 4, 8])
@pytest.mark.parametrize("name", list(bench.SCHEDULES))
def test_torch_schedule_order_gives_the_closed_forms(name, pp):
    for m in (2 * pp, 4 * pp):
        actions = bench.schedule_actions(name, pp, m)
        sim = bench.simulate(actions, COSTS, bench.n_stages(name, pp))
        want = bench.closed_form(name, pp, m, COSTS)["fraction"]
        for rank, got in sim["fraction"].items():
            assert got == pytest.approx(want, rel=1e-9), (name, pp, m, rank)
        assert [sim["inflight"][r] for r in range(pp)] == bench.closed_form_memory(name, pp, m), (name, pp, m)


def test_dualpipev_bubble_comes_from_sending_the_pair_after_its_backward():
    """torch runs DualPipeV's F&B pair as F then B and sends both outputs after the pair. That is
    V3's (p-1)(F&B+B-3W) with F&B = F+B; were the forward's output sent at once, the bubble would be
    ZB1P's (p-1)(F+B-2W)."""
    actions = bench.schedule_actions("dualpipev", PP, M)
    n = bench.n_stages("dualpipev", PP)
    atomic = bench.simulate(actions, COSTS, n, pairs="atomic")["fraction"][0]
    torch_order = bench.simulate(actions, COSTS, n, pairs="torch")["fraction"][0]
    split = bench.simulate(actions, COSTS, n, pairs="split")
    assert torch_order == pytest.approx(atomic, rel=1e-9)
    F, B, W = COSTS.F, COSTS.B, COSTS.W
    assert split["span_s"] == pytest.approx(2 * M * (F + B) + (PP - 1) * (F + B - 2 * W), rel=1e-9)


# -- 4 gloo ranks, measured -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def measured():
    # One spawn for all three (starting 4 torch processes is most of the cost); of 2 measured steps
    # per schedule the shortest counts, since load on a shared machine only ever adds time.
    raw = bench.run(MEASURED, pp=PP, m=M, costs=COSTS, repeats=2)
    results = {name: bench.analyze(name, raw[name], PP, M, COSTS) for name in MEASURED}
    bench.report(list(results.values()))  # shown with -s, or on a failure
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", MEASURED)
def test_measured_bubble_matches_closed_form(measured, name):
    """The ranks idle the closed-form share of the step, within 10%. Every rank does the same work,
    so the closed form is the same for each; the mean over ranks (1 - mean busy / span) is the one
    compared, as it does not depend on which rank a stray delay of the machine lands on. The runtime's
    own cost between ops (schedule loop, p2p calls, wake-ups; torch's python inside an op counts as
    the op) only adds idle time: 30-50 ms per step, 2-5% of these bubbles (0.27, 0.18, 0.16 of the
    step) at 150 ms per F; a schedule that ran another's order would be off by 30% or more
    (1F1B 0.273, ZB1P 0.184, DualPipeV 0.158, ZBV 0.070; DualPipeV sending its pairs' forward
    outputs at once 0.101)."""
    want = bench.closed_form(name, PP, M, COSTS)["fraction"]
    got = measured[name]["fraction_mean"]
    assert abs(got - want) < 0.10 * want, (name, got, want, [r["fraction"] for r in measured[name]["ranks"]])
    for r in measured[name]["ranks"]:  # and no rank is far off (a rank doing extra work would be)
        assert abs(r["fraction"] - want) < 0.25 * want, (name, r["rank"], r["fraction"], want)


@pytest.mark.slow
@pytest.mark.parametrize("name", MEASURED)
def test_measured_activations_in_flight_match_closed_form(measured, name):
    """Peak resident memory of a step / one chunk's activation = p - r on 1F1B rank r (p on rank 0,
    V3: PP), p on every ZB1P rank (V3: PP; rank r defers its W by r ops and keeps those activations)
    and 2p + 1 on every DualPipeV rank (V3: PP + 1 with PP = 2p chunks). Tolerance half a unit: the
    rest of a step (gloo buffers, small tensors, python objects) moves the resident set by ~0.1-0.3 MiB
    against a 2 MiB unit, while one activation too many or too few is a whole unit."""
    want = bench.closed_form_memory(name, PP, M)
    for r in measured[name]["ranks"]:
        assert abs(r["inflight_measured"] - want[r["rank"]]) <= 0.5, (name, r["rank"], r["inflight_measured"])


@pytest.mark.slow
def test_zero_bubble_schedules_really_split_the_backward(measured):
    """The synthetic stage's I and W are separate autograd branches, so ZB1P's last rank runs W of a
    micro-batch after the I (and F) of later ones; 1F1B runs them back to back in one backward."""
    def gaps(name, rank):
        ev = [(k, mb) for k, s, mb, *_ in measured[name]["timeline"][rank]["events"]]
        return [ev.index(("W", mb)) - ev.index(("I", mb)) for mb in range(M)]
    assert max(gaps("zb1p", PP - 1)) > 1
    assert all(g == -1 for g in gaps("1f1b", PP - 1))  # one B: autograd runs the W branch, then I
