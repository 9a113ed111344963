"""Splicing an SAE into a model, and the loss recovered, on a tiny causal language model."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import MiniBatchDictionaryLearning

from sksae import SparseAutoencoder
from sksae.activations import loss_recovered, splice

VOCAB, D, T = 23, 6, 9


class Block(torch.nn.Module):
    """Causal mixing (running mean over earlier positions) and an MLP; returns a tuple."""

    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.GELU(),
                                       torch.nn.Linear(16, D))

    def forward(self, h):
        mixed = h.cumsum(1) / torch.arange(1, h.shape[1] + 1, device=h.device)[:, None]
        out = h + mixed + self.mlp(h)
        return out, mixed.sum()  # a second element to keep


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, D)
        self.block = Block()
        self.head = torch.nn.Linear(D, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h, _ = self.block(self.embed(input_ids))
        return self.head(torch.tanh(h))


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return TinyLM().eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (12, T), generator=torch.Generator().manual_seed(1))


def _sae(W_enc, W_dec, b_enc=None, b_dec=None, architecture="relu"):
    """A 'fitted' SAE with the given weights (fitted for 0 epochs, then overwritten)."""
    X = np.random.default_rng(0).normal(size=(32, W_dec.shape[1])).astype(np.float32)
    sae = SparseAutoencoder(n_components=W_dec.shape[0], architecture=architecture,
                            max_iter=0, random_state=0).fit(X)
    sae.encoder_weights_ = np.asarray(W_enc, np.float32)
    sae.components_ = np.asarray(W_dec, np.float32)
    sae.encoder_bias_ = np.zeros(W_dec.shape[0], np.float32) if b_enc is None else b_enc
    sae.decoder_bias_ = np.zeros(W_dec.shape[1], np.float32) if b_dec is None else b_dec
    return sae


def identity_sae(scale=1.0):
    """x_hat = scale * x exactly: split-sign ReLU codes [relu(x), relu(-x)]."""
    eye = np.eye(D)
    return _sae(np.vstack([eye, -eye]), scale * np.vstack([eye, -eye]))


def zero_sae():
    return _sae(np.zeros((4, D)), np.zeros((4, D)))


def _ce(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).double(),
                                             ids[:, 1:].reshape(-1)).item()


def _loss_with(lm, ids, fn):
    """Mean next-token CE with the block's first output replaced by fn(x), by a hand hook."""
    def hook(mod, args, out):
        return (fn(out[0]), out[1])

    h = lm.block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return _ce(lm(ids), ids)
    finally:
        h.remove()


def test_identity_sae_gives_the_clean_loss_and_zero_kl(lm, tokens):
    got = loss_recovered(lm, "block", identity_sae(), tokens.split(5))
    with torch.no_grad():
        clean = _ce(lm(tokens), tokens)
    assert got.loss_clean == pytest.approx(clean, rel=1e-6)
    assert got.loss_spliced == pytest.approx(got.loss_clean, rel=1e-6, abs=1e-7)
    assert got.loss_recovered == pytest.approx(1.0, abs=1e-5)
    assert abs(got.kl_spliced) < 1e-9
    assert got.kl_score == pytest.approx(1.0, abs=1e-6)
    assert got.n_loss_terms == tokens.shape[0] * (T - 1)
    assert got.n_batches == 3


def test_zero_sae_equals_zero_ablation(lm, tokens):
    got = loss_recovered(lm, "block", zero_sae(), tokens.split(5))
    assert got.loss_spliced == pytest.approx(got.loss_zero_ablated, rel=1e-7)
    assert got.kl_spliced == pytest.approx(got.kl_zero_ablated, rel=1e-7)
    assert got.loss_recovered == pytest.approx(0.0, abs=1e-6)
    assert got.kl_score == pytest.approx(0.0, abs=1e-6)
    # independent: the loss with the output set to zero, and to the mean of the outputs
    assert got.loss_zero_ablated == pytest.approx(
        _loss_with(lm, tokens, torch.zeros_like), rel=1e-6)
    with torch.no_grad():
        mean = lm.block(lm.embed(tokens))[0].reshape(-1, D).double().mean(0).float()
    assert got.loss_mean_ablated == pytest.approx(
        _loss_with(lm, tokens, lambda x: mean.expand_as(x)), rel=1e-6)


@pytest.mark.parametrize("scale", [0.3, 0.8])
def test_recovered_score_of_a_known_mixture(lm, tokens, scale):
    """x_hat = scale * x (a mixture of the clean activation and zero ablation): the score is
    the formula on independently computed losses."""
    got = loss_recovered(lm, "block", identity_sae(scale), [tokens])
    with torch.no_grad():
        clean = _ce(lm(tokens), tokens)
    zero = _loss_with(lm, tokens, torch.zeros_like)
    spliced = _loss_with(lm, tokens, lambda x: scale * x)
    assert got.loss_spliced == pytest.approx(spliced, rel=1e-6)
    assert got.loss_recovered == pytest.approx((zero - spliced) / (zero - clean), rel=1e-5)
    with torch.no_grad():
        p = torch.log_softmax(lm(tokens).double(), -1)
        h = lm.block.register_forward_hook(lambda m, a, o: (scale * o[0], o[1]))
        q = torch.log_softmax(lm(tokens).double(), -1)
        h.remove()
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert got.kl_spliced == pytest.approx(kl, rel=1e-5)


def test_mask_keeps_its_positions_unchanged(lm, tokens):
    sae = identity_sae(0.5)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[:, 5:] = True
    seen = {}
    with torch.no_grad():
        x = lm.block(lm.embed(tokens))[0]
        clean_logits = lm(tokens)
        with splice(lm, "block", sae, mask=mask) as handle:
            probe = lm.head.register_forward_hook(lambda m, a, o: seen.update(inp=a[0]))
            logits = lm(tokens)
            probe.remove()
    # what the head saw: the exact clean rows where the mask is off, x / 2 where it is on
    assert torch.equal(seen["inp"][~mask], torch.tanh(x)[~mask])
    torch.testing.assert_close(seen["inp"][mask], torch.tanh(0.5 * x)[mask])
    assert torch.equal(logits[:, :5], clean_logits[:, :5])  # causal: earlier positions
    assert not torch.allclose(logits[:, 5:], clean_logits[:, 5:])
    assert handle.codes.shape == (int(mask.sum()), 2 * D)
    assert handle.n_calls == 1
    # the same through loss_recovered, with a mask callable of the batch
    got = loss_recovered(lm, "block", sae, [tokens], mask=lambda b: mask)
    assert got.loss_spliced == pytest.approx(_ce(logits, tokens), rel=1e-6)
    # the mean ablated is the mean over the masked positions only
    mean = x[mask].double().mean(0).float()
    assert got.loss_mean_ablated == pytest.approx(_loss_with(
        lm, tokens, lambda y: torch.where(mask[..., None], mean.expand_as(y), y)), rel=1e-6)


def test_tuple_output_keeps_its_other_elements(lm, tokens):
    with torch.no_grad():
        clean = lm.block(lm.embed(tokens))
        with splice(lm, "block", identity_sae(0.5)):
            out = lm.block(lm.embed(tokens))
    assert isinstance(out, tuple) and len(out) == 2
    assert torch.equal(out[1], clean[1])
    torch.testing.assert_close(out[0], 0.5 * clean[0])
    assert not lm.block._forward_hooks  # removed on exit


def test_error_term_and_edit(lm, tokens):
    sae = identity_sae(0.5)
    with torch.no_grad():
        x = lm.block(lm.embed(tokens))[0]
        with splice(lm, "block", sae, error_term=True) as handle:
            out = lm.block(lm.embed(tokens))[0]
        torch.testing.assert_close(out, x)  # x_hat + error = x
        torch.testing.assert_close(handle.error, (0.5 * x).reshape(-1, D))

        def drop_first(codes):
            codes[:, 0] = 0  # relu(x_0) no longer decoded
            return codes

        with splice(lm, "block", sae, error_term=True, edit=drop_first):
            edited = lm.block(lm.embed(tokens))[0]
    delta = torch.zeros_like(x)
    delta[..., 0] = -0.5 * torch.relu(x[..., 0])
    torch.testing.assert_close(edited, x + delta)
    # gradients reach the input through the reconstruction
    emb = lm.embed(tokens).detach().requires_grad_(True)
    with splice(lm, "block", sae):
        lm.block(emb)[0].sum().backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


def test_codes_on_the_models_dtype():
    torch.manual_seed(0)
    lm = TinyLM().to(torch.bfloat16).eval()
    ids = torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), splice(lm, "block", identity_sae()) as handle:
        out = lm(ids)
    assert handle.codes.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    with torch.no_grad(), splice(lm, "block", identity_sae(), dtype=torch.float32) as handle:
        lm(ids)
    assert handle.codes.dtype == torch.float32


def test_any_fitted_dictionary_and_user_losses(lm, tokens):
    with torch.no_grad():
        X = lm.block(lm.embed(tokens))[0].reshape(-1, D).numpy()
    mbdl = MiniBatchDictionaryLearning(n_components=2 * D, alpha=0.01, max_iter=3,
                                       transform_algorithm="lasso_lars", transform_alpha=0.01,
                                       random_state=0).fit(X)
    with torch.no_grad(), splice(lm, "block", mbdl) as handle:
        lm(tokens)
    x_hat = mbdl.inverse_transform(mbdl.transform(X))
    np.testing.assert_allclose(X - handle.error.numpy(), x_hat, rtol=1e-5, atol=1e-5)
    # a user loss of (output, batch), and a divergence from the clean output
    ce = loss_recovered(lm, "block", mbdl, [tokens], ablations=("zero",))
    mine = loss_recovered(lm, "block", mbdl, [tokens], ablations=("zero",),
                          loss=lambda out, ids: torch.nn.functional.cross_entropy(
                              out[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1),
                              reduction="none"))
    for key in ("loss_clean", "loss_spliced", "loss_zero_ablated", "loss_recovered"):
        assert mine[key] == pytest.approx(ce[key], rel=1e-6)
    assert "kl_spliced" not in mine and "loss_mean_ablated" not in mine

    def distance(clean, out):
        return 1 - torch.nn.functional.cosine_similarity(clean, out, dim=-1)

    div = loss_recovered(lm, "block", identity_sae(0.5), [tokens], loss=distance,
                         against_clean=True)
    assert div.loss_clean == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        clean = lm(tokens)
    h = lm.block.register_forward_hook(lambda m, a, o: (0.5 * o[0], o[1]))
    with torch.no_grad():
        half = lm(tokens)
    h.remove()
    assert div.loss_spliced == pytest.approx(distance(clean, half).mean().item(), rel=1e-5)


def test_dict_batches_use_their_attention_mask(lm, tokens):
    attention = torch.ones(tokens.shape, dtype=torch.long)
    attention[:, 7:] = 0  # padding at the end
    batches = [{"input_ids": tokens, "attention_mask": attention}]
    got = loss_recovered(lm, "block", identity_sae(0.5), batches, ablations=("zero",))
    assert got.n_loss_terms == tokens.shape[0] * 6  # targets 1..6
    mask = attention.bool()
    with torch.no_grad(), splice(lm, "block", identity_sae(0.5), mask=mask):
        logits = lm(tokens)
    ce = torch.nn.functional.cross_entropy(logits[:, :6].reshape(-1, VOCAB),
                                           tokens[:, 1:7].reshape(-1)).item()
    assert got.loss_spliced == pytest.approx(ce, rel=1e-6)


def test_errors(lm, tokens):
    with pytest.raises(ValueError, match="no submodule 'blok'"):
        with splice(lm, "blok", identity_sae()):
            pass
    with pytest.raises(ValueError, match="the mask has shape"):
        with torch.no_grad(), splice(lm, "block", identity_sae(), mask=torch.ones(2, 2) > 0):
            lm(tokens)
    with pytest.raises(ValueError, match="ablations"):
        loss_recovered(lm, "block", identity_sae(), [tokens], ablations=("ones",))
    with pytest.raises(ValueError, match="empty"):
        loss_recovered(lm, "block", identity_sae(), [], ablations=("zero",))
    with pytest.raises(TypeError, match="transform"):
        with splice(lm, "block", object()):
            pass


def test_loss_recovered_encodes_a_batch_chunk_by_chunk(lm, tokens, monkeypatch):
    # a language model's batch of 32k tokens has 128 GB of codes at 1M latents: the spliced
    # run reconstructs it a chunk of rows at a time, with the same loss
    import sksae._base
    from sksae.activations._splice import _Reconstruction

    sae = identity_sae(0.5)
    whole = loss_recovered(lm, "block", sae, [tokens], ablations=("zero",))
    sizes = []
    encode = _Reconstruction.encode
    monkeypatch.setattr(_Reconstruction, "encode",
                        lambda self, x: sizes.append(len(x)) or encode(self, x))
    monkeypatch.setattr(sksae._base, "inference_chunk_rows", lambda *a: 10)
    chunked = loss_recovered(lm, "block", sae, [tokens], ablations=("zero",))
    assert max(sizes) == 10 and sum(sizes) == tokens.numel()
    for key in ("loss_spliced", "loss_recovered", "kl_spliced"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-6)
