"""Document masking (packed SFT rows, left-padded prompts), per-token log-probs and entropy — the model
features post-training stands on — against running each document alone, and under tensor parallelism
against one process."""
import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from model import build_model, preset
from model.attention import attention_mask
from model.transformer import IGNORE_INDEX

PRESETS = ["tiny-deepseek-v3", "tiny-qwen2.5-1.5b"]   # MLA + MoE + MTP; GQA dense with qkv bias
# Rotary angles are fp32 (model/layers.py), so the same relative offset at another absolute position
# rounds differently: shifted documents agree to fp32's ~1e-7, not fp64's. Unmasked attention is off
# by ~1e-2 (asserted below), so this still separates right from wrong.
SHIFT = dict(rtol=1e-6, atol=1e-8)


def _model(name, **kw):
    cfg = preset(name, **kw)
    return build_model(cfg, dtype=torch.float64, seed=0).eval(), cfg


def test_attention_mask_is_causal_within_documents():
    doc = torch.tensor([[0, 0, 1, 1, 1, 2]])
    m = attention_mask(6, 6, 0, "cpu", doc)[0]
    want = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0],
                         [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(m, want)
    # a decode step at position 4 sees the cached keys of its own document only
    assert attention_mask(1, 5, 4, "cpu", doc)[0, 0].tolist() == [False, False, True, True, True]


@pytest.mark.parametrize("name", PRESETS)
def test_packed_documents_equal_documents_alone(name):
    """Logits of a packed row equal those of each document run alone (RoPE is relative, so positions
    need not restart), and the packed loss equals the sum of the documents' losses."""
    net, cfg = _model(name)
    g = torch.Generator().manual_seed(1)
    lens = [5, 9, 3]
    docs = [torch.randint(0, cfg.vocab_size, (1, n), generator=g) for n in lens]
    tokens = torch.cat(docs, 1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lens)], 1)
    with torch.no_grad():
        packed = net(tokens, doc_ids=doc_ids)
        alone = torch.cat([net(d) for d in docs], 1)
    torch.testing.assert_close(packed, alone, **SHIFT)
    # without the mask the later documents see the earlier ones: the check can fail
    with torch.no_grad():
        assert (net(tokens)[:, lens[0]:] - alone[:, lens[0]:]).abs().max() > 1e-3

    net.train()
    labels = tokens.roll(-1, 1)
    ends = torch.tensor(lens).cumsum(0) - 1
    labels[0, ends] = IGNORE_INDEX            # no target across a document boundary
    out = net.loss(tokens, labels, doc_ids=doc_ids, mtp_lambda=0.3)
    total = {k: 0.0 for k in ("lm_loss", "mtp_loss")}
    n_all = int((labels != IGNORE_INDEX).sum())
    for d in docs:
        lab = d.roll(-1, 1)
        lab[0, -1] = IGNORE_INDEX
        o = net.loss(d, lab, mtp_lambda=0.3)
        n = int((lab != IGNORE_INDEX).sum())
        for k in total:
            if k in o:
                total[k] += o[k].item() * n / n_all
    torch.testing.assert_close(out["lm_loss"].item(), total["lm_loss"], **SHIFT)
    if cfg.n_mtp:
        torch.testing.assert_close(out["mtp_loss"].item(), total["mtp_loss"], **SHIFT)


@pytest.mark.parametrize("name", PRESETS)
def test_left_padded_cached_decoding_equals_unpadded(name):
    """Prompts of different lengths, left-padded into one batch and decoded with the KV cache (MLA:
    the absorbed latent path), give each prompt's own logits at every step."""
    net, cfg = _model(name)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, cfg.vocab_size, (n,), generator=g) for n in (6, 3, 1)]
    steps = torch.randint(1, cfg.vocab_size, (3, 4), generator=g)    # forced continuation tokens
    P = max(len(p) for p in prompts)
    tokens = torch.zeros(3, P, dtype=torch.long)
    doc = torch.zeros(3, P + steps.shape[1], dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = p
        doc[i, :P - len(p)] = -1                                    # padding: its own document
    with torch.no_grad():
        caches = net.new_cache(3, P + steps.shape[1])
        got = [net(tokens, 0, caches, doc_ids=doc)[:, -1]]
        for j in range(steps.shape[1]):
            got.append(net(steps[:, j:j + 1], P + j, caches, doc_ids=doc)[:, -1])
        for i, p in enumerate(prompts):
            full = net(torch.cat([p, steps[i]])[None])[0]
            want = full[len(p) - 1:]
            torch.testing.assert_close(torch.stack([x[i] for x in got]), want, **SHIFT)


def test_token_logprobs_and_entropy():
    net, cfg = _model("tiny-deepseek-v3")
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 7), generator=g)
    targets = tokens.roll(-1, 1)
    targets[:, :2] = IGNORE_INDEX
    out = net.token_logprobs(tokens, targets, entropy=True)
    logp = net(tokens).log_softmax(-1)
    want = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0].masked_fill(targets == IGNORE_INDEX, 0)
    torch.testing.assert_close(out["logprobs"], want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["entropy"], -(logp.exp() * logp).sum(-1), rtol=1e-10, atol=1e-12)
    assert out["logprobs"].requires_grad and not out["entropy"].requires_grad


def tp_logprobs_rank(name: str):
    import parallel
    cfg = preset(name)
    ref = build_model(cfg, dtype=torch.float64, seed=0)
    mesh = parallel.build_mesh(parallel.ParallelConfig(tp=dist.get_world_size()), "cpu")
    net = parallel.parallelize(build_model(cfg, device="meta", dtype=torch.float64), mesh)
    parallel.init_parallel_weights(net, mesh, seed=0)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, cfg.vocab_size, (2, 10), generator=g)   # the MoE token split needs seq % tp == 0
    targets = tokens.roll(-1, 1)
    targets[:, -1] = IGNORE_INDEX
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    want = ref.token_logprobs(tokens, targets, doc_ids, entropy=True)
    got = net.token_logprobs(tokens, targets, doc_ids, entropy=True)
    torch.testing.assert_close(got["logprobs"], want["logprobs"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got["entropy"], want["entropy"], rtol=1e-10, atol=1e-10)
    want["logprobs"].sum().backward()
    got["logprobs"].sum().backward()
    parallel.finish_grad_sync(net, mesh)
    grads = parallel.full_state(net, mesh, grads=True)
    for k, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[k], p.grad, rtol=1e-8, atol=1e-10, msg=k)


def test_token_logprobs_tp2_equal_one_process():
    run_ranks(2, tp_logprobs_rank, "tiny-deepseek-v3")
