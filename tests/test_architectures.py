"""Breadth: decoders whose blocks differ in structure from Llama's are found, labelled, calibrated and decoded right.

conftest's ARCHS run through every test of the rewrite; the architectures here each bring a structure of their own
(parallel attention and MLP with one norm or two, fused q/k/v, multi-query, non-gated MLPs, activations written out
elementwise, norms after the projections, q/k norms over the whole width, projections written as matmuls, mixtures of
experts whose attention alone is sparsified, layers traced in frames of their own after a graph break) and run one
end-to-end path each: discovery labels each block as expected, ``calibrate`` allocates on the captured graph, and the
lean decode loop through the teal backend computes, teacher-forced, the logits that hooks masking each planned
linear's input compute.
"""
import pytest
import torch
import transformers as T

import teal_fx
from teal_fx.generate import cache_kwarg
from tests.conftest import masked_inputs

GATED = ["q", "k", "v", "o", "gate", "up", "down"]
PLAIN = ["q", "k", "v", "o", "up", "down"]
FUSED_QKV = ["qkv", "o", "up", "down"]
ATTENTION_ONLY = ["q", "k", "v", "o"]
# name -> (config class name, roles of each block, config overrides)
STRUCTURES = {
    "gpt_neox": ("GPTNeoXConfig", FUSED_QKV, {}),  # parallel attention and MLP, one LayerNorm each
    "phi": ("PhiConfig", PLAIN, {}),  # parallel, one shared LayerNorm; gelu_new written with products of its input
    "cohere": ("CohereConfig", GATED, {}),  # parallel, shared norm, gated MLP
    "gptj": ("GPTJConfig", PLAIN, {"rotary_dim": 8}),  # parallel, interleaved rotary
    "codegen": ("CodeGenConfig", FUSED_QKV, {"rotary_dim": 8}),  # parallel, fused q/v/k in model-parallel order
    "gpt_bigcode": ("GPTBigCodeConfig", FUSED_QKV, {"multi_query": True}),  # one key/value head in the fused qkv
    "persimmon": ("PersimmonConfig", FUSED_QKV, {}),  # fused qkv with q/k LayerNorms, relu² MLP
    "starcoder2": ("Starcoder2Config", PLAIN, {}),  # biases everywhere, non-gated MLP
    "nemotron": ("NemotronConfig", PLAIN, {}),  # relu² non-gated MLP
    "apertus": ("ApertusConfig", PLAIN, {}),  # xIELU: an activation of exp / where, no named activation op
    "olmo2": ("Olmo2Config", GATED, {}),  # norms after attention and MLP, q/k norms over the whole width
    "gemma3": ("Gemma3TextConfig", GATED, {}),  # q/k norms per head, pre- and post-norms, sliding window layers
    "glm4": ("Glm4Config", ["q", "k", "v", "o", "gate_up", "down"], {}),  # fused gate/up, post-norms
    "granite": ("GraniteConfig", GATED, {}),  # residual and attention multipliers
    "stablelm": ("StableLmConfig", GATED, {}),  # LayerNorm, partial rotary
    # projections written as ``x @ W.T + b`` (FalconLinear), read as linears by rewrite_matmul_as_linear
    "falcon": ("FalconConfig", FUSED_QKV, {"new_decoder_architecture": True, "num_kv_heads": 2, "bias": True}),
    "falcon_mqa": ("FalconConfig", FUSED_QKV, {"multi_query": True, "parallel_attn": True}),  # Falcon-7B's layout
    "bloom": ("BloomConfig", FUSED_QKV, {}),  # eager attention whose scores are baddbmm(alibi, q, k)
    "gpt2": ("GPT2Config", FUSED_QKV, {}),  # Conv1D: weights stored [in, out], addmm(bias, x, W)
    # mixtures of experts: the attention is sparsified, greedy over its four linears; the experts stay dense
    "mixtral": ("MixtralConfig", ATTENTION_ONLY, {"num_local_experts": 4}),
    "qwen3_moe": ("Qwen3MoeConfig", ATTENTION_ONLY, {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    # a static cache's get_seq_length() breaks the graph before the layer loop: the layers are traced in frames of
    # their own, where only the weights' identities give their names; OPT flattens its MLP's tokens to rows
    "opt": ("OPTConfig", PLAIN, {"ffn_dim": 96, "word_embed_proj_dim": 64}),
    "biogpt": ("BioGptConfig", PLAIN, {}),
    "xglm": ("XGLMConfig", PLAIN, {"ffn_dim": 96, "d_model": 64, "num_layers": 2, "attention_heads": 4}),
}
EAGER_ATTENTION = {"xglm", "bloom"}  # transformers has no SDPA path for it
MULTI_HEAD_ONLY = {"falcon", "falcon_mqa", "gpt_neox", "phi", "gptj", "codegen", "gpt_bigcode", "persimmon", "opt",
                   "biogpt", "xglm", "bloom", "gpt2"}  # no num_key_value_heads


def structure_model(name: str) -> torch.nn.Module:
    cls_name, _, overrides = STRUCTURES[name]
    cls = getattr(T, cls_name, None)
    if cls is None:
        pytest.skip(f"transformers {T.__version__} has no {cls_name}")
    torch.manual_seed(0)
    kv = {} if name in MULTI_HEAD_ONLY else {"num_key_value_heads": 2}
    cfg = cls(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kv, **overrides)
    for attr, value in {"n_inner": 96, "ffn_dim": 96}.items():  # the MLP width where a config names it otherwise
        if hasattr(cfg, attr):
            setattr(cfg, attr, value)
    model_cls = T.AutoModelForCausalLM._model_mapping[type(cfg)]
    sdpa = name not in EAGER_ATTENTION and getattr(model_cls, "_supports_sdpa", True)  # GPT-J, CodeGen: 5.2x only
    cfg._attn_implementation = "sdpa" if sdpa else "eager"
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # a realistic spread of activations (HF's init is tiny)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5)
    return model


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_structure_labelled_calibrated_and_decoded(name):
    model = structure_model(name)
    found = teal_fx.find_linears(model)
    by_block: dict[int, list] = {}
    for m in found:
        by_block.setdefault(m.block, []).append(m)
    assert sorted(by_block) == [0, 1]
    for b, ms in by_block.items():
        assert sorted(m.role for m in ms) == sorted(STRUCTURES[name][1]), (b, [(m.role, m.key) for m in ms])
        assert all(f".{b}." in m.key for m in ms)  # each linear sits in the block its module path says
    if STRUCTURES[name][1] == ATTENTION_ONLY:  # the user is told the MLPs stay dense
        (graph,), _ = teal_fx.capture_graphs(model)
        assert "its MLP not (a mixture of experts" in graph.discovery.summary()

    plan = _calibrated(model)
    assert sorted(plan.linears) == sorted(m.key for m in found)
    assert plan.model_sparsity() == pytest.approx(0.5, abs=0.05)
    _check_decode(model, plan)


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("name", ["falcon", "gpt_neox", "opt", "gpt2"])
def test_structure_with_quantized_weights(name, weights):
    """Quantized weights compose with these structures: a matmul-written projection, a parallel block, flattened
    tokens, weights stored [in, out], each quantized in place and decoded against the hooks on the quantized model."""
    model = structure_model(name)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
    plan = _calibrated(model, weights=weights)
    assert plan.weights == weights
    with torch.no_grad():  # dense, the quantized model stays the float one up to rounding (not a transposed weight)
        after = model(ids).logits
    agree = torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0)
    assert agree > (0.999 if weights == "int8" else 0.95), agree
    assert sum(type(m).__name__ == "QuantizedLinear" for m in model.modules()) == len(plan.linears)
    _check_decode(model, plan)


def _calibrated(model, **kwargs):
    data = torch.randint(3, 128, (4, 48), generator=torch.Generator().manual_seed(1))
    return teal_fx.calibrate(model, data, sparsity=0.5, num_sequences=4, seq_len=48, greedy_sequences=2,
                             progress=False, **kwargs)


def _check_decode(model, plan) -> None:
    """Teacher-forced on one random sequence, the logits each position's token is chosen by (the prefill dense, each
    decode step sparse) equal those of hooks masking each planned linear's input in the plain model."""
    tokens = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    prompt = 5
    try:
        got = teal_fx.decode_logits(model, tokens, prompt, backend="teal", options={"compiler": "eager"})
    except ValueError as e:  # the user is told when transformers' own model cannot (Bloom in 5.17: ALiBi's length)
        if "cannot decode into a static cache" not in str(e):
            raise
        pytest.skip(str(e))
    with torch.no_grad():
        step = model(tokens[:, :prompt], use_cache=True)
        ref, dense, cache = [step.logits[:, -1]], [step.logits[:, -1]], step.past_key_values
        dense_cache = model(tokens[:, :prompt], use_cache=True).past_key_values
        for i in range(prompt, tokens.shape[1] - 1):
            dense_step = model(tokens[:, i:i + 1], **{cache_kwarg(model): dense_cache}, use_cache=True)
            dense.append(dense_step.logits[:, -1])
            dense_cache = dense_step.past_key_values
            with masked_inputs(model, plan):
                step = model(tokens[:, i:i + 1], **{cache_kwarg(model): cache}, use_cache=True)
            ref.append(step.logits[:, -1])
            cache = step.past_key_values
    ref, dense = torch.stack(ref, 1), torch.stack(dense, 1)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[:, 0], dense[:, 0], atol=1e-4, rtol=1e-4)  # the prefill stays dense
    assert (got[:, 1:] - dense[:, 1:]).abs().max() > 1e-2  # the decode steps are sparse
