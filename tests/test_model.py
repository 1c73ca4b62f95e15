"""The reference model: shapes, KV-cache consistency, expert routing in batches, parameter counts, save/load."""

import numpy as np
import pytest
import torch

from rsvlm_edge.config import ConfigError, ModelConfig, preset, rsunivlm_1b_config, tiny_config
from rsvlm_edge.modeling import build_model, load_model, parameter_counts, save_model
from rsvlm_edge.modeling.model import attention_bias, sincos_2d


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(), seed=0).eval()


def test_visual_tokens_per_sensor(model):
    cfg = model.cfg
    with torch.no_grad():
        for sensor, bands in cfg.sensors.items():
            out = model.encode_images(torch.randn(2, bands, cfg.image_size, cfg.image_size), sensor)
            assert out.shape == (2, cfg.num_visual_tokens, cfg.hidden_size)
            assert torch.isfinite(out).all()
    with pytest.raises(KeyError, match="unknown sensor"):
        model.encode_images(torch.randn(1, 3, cfg.image_size, cfg.image_size), "lidar")


def test_incremental_decode_matches_full_forward(model):
    cfg = model.cfg
    torch.manual_seed(1)
    b, s, split = 2, 18, 11
    emb = torch.randn(b, s, cfg.hidden_size)
    mask = torch.ones(b, s)
    mask[1, :4] = 0  # left padding on row 1
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full, _ = model.decode(emb, pos, mask, model.empty_cache(b), 1, all_logits=True)
        logits, new = model.decode(emb[:, :split], pos[:, :split], mask[:, :split], model.empty_cache(b), 1)
        cache = new
        steps = [logits]
        for t in range(split, s):
            logits, new = model.decode(emb[:, t:t + 1], pos[:, t:t + 1], mask[:, :t + 1], cache, 1)
            cache = [(torch.cat([pk, nk]), torch.cat([pv, nv])) for (pk, pv), (nk, nv) in zip(cache, new)]
            steps.append(logits)
    inc = torch.cat(steps, 1)
    assert inc.shape == (b, s - split + 1, cfg.vocab_size)
    assert (inc - full[:, split - 1:]).abs().max() < 1e-4
    assert cache[0][0].shape == (s, b, cfg.num_kv_heads, cfg.head_dim)  # sequence-major cache


def test_mixed_expert_batch_equals_per_request(model):
    cfg = model.cfg
    emb = torch.randn(3, 7, cfg.hidden_size)
    mask = torch.ones(3, 7)
    pos = torch.arange(7).expand(3, 7)
    with torch.no_grad():
        mixed, _ = model.decode(emb, pos, mask, model.empty_cache(3), torch.tensor([2, 0, 1]), all_logits=True)
        for row, e in enumerate([2, 0, 1]):
            alone, _ = model.decode(emb[row:row + 1], pos[row:row + 1], mask[row:row + 1], model.empty_cache(1), e,
                                    all_logits=True)
            assert torch.allclose(mixed[row], alone[0], atol=1e-5)
        # and the experts really differ once their weights differ
        a, _ = model.decode(emb[:1], pos[:1], mask[:1], model.empty_cache(1), 0)
        b, _ = model.decode(emb[:1], pos[:1], mask[:1], model.empty_cache(1), 2)
    assert (a - b).abs().max() > 1e-3


def test_attention_bias_is_causal_and_masks_padding():
    mask = torch.tensor([[0.0, 1, 1, 1]])
    bias = attention_bias(mask, query_len=2)  # 2 new queries over 4 keys (2 past)
    allowed = bias[0, 0] == 0
    assert allowed.tolist() == [[False, True, True, False], [False, True, True, True]]


def test_router_logits_shape(model):
    ids = torch.randint(0, model.cfg.vocab_size, (4, 9))
    mask = torch.ones(4, 9)
    mask[0, 5:] = 0
    out = model.route(ids, mask)
    assert out.shape == (4, model.cfg.num_experts)
    # padding positions must not change the pooled embedding
    ids2 = ids.clone()
    ids2[0, 5:] = 0
    assert torch.allclose(model.route(ids2, mask)[0], out[0], atol=1e-6)


def test_rsunivlm_1b_parameter_counts():
    cfg = rsunivlm_1b_config()
    assert cfg.num_visual_tokens == 730  # 27x27 patches + newline
    counts = parameter_counts(build_model(cfg, device="meta", seed=None))
    assert 1.60e9 < counts["stored"] < 1.70e9
    assert 1.00e9 < counts["active"] < 1.06e9
    assert counts["stored"] - counts["active"] >= 2 * counts["per_expert"]


def test_tiny_fits_the_repo_budget(model):
    counts = parameter_counts(model)
    assert counts["stored"] * 2 <= 50e6  # fp16 safetensors <= 50 MB
    assert 64 <= model.cfg.num_visual_tokens - 1 <= 196


def test_save_load_roundtrip(tmp_path, model):
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 5))
    with torch.no_grad():
        a, _ = model.decode(model.embed_tokens(ids), torch.arange(5)[None], torch.ones(1, 5), model.empty_cache(1), 0)
        b, _ = loaded.decode(loaded.embed_tokens(ids), torch.arange(5)[None], torch.ones(1, 5), loaded.empty_cache(1), 0)
    assert (a - b).abs().max() < 0.05  # fp16 storage
    (tmp_path / "config.json").write_text('{"hidden_size": 7, "bogus": 1}')
    with pytest.raises(ConfigError, match="unknown model config keys: bogus"):
        load_model(tmp_path)


def test_config_validation_and_presets():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3).validate()
    with pytest.raises(ConfigError, match="unknown config preset"):
        preset("huge")
    assert ModelConfig.from_dict(tiny_config().to_dict()) == tiny_config()
    assert np.isclose(rsunivlm_1b_config().head_dim, 64)


def test_sincos_2d_gives_every_patch_its_own_code():
    code = sincos_2d(8, 256)
    assert code.shape == (64, 256) and code.abs().max() <= 1.0
    distances = torch.cdist(code, code) + torch.eye(64) * 1e9
    assert distances.min() > 0.5  # no two patches share (or nearly share) a code
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(8, 258)


def test_token_position_embedding_is_added_to_the_patch_tokens_only():
    """The same weights with and without the field differ exactly by the 2-D code on the patch tokens (the newline
    token has no position), so a token says which patch it came from whatever the image holds."""
    cfg = ModelConfig(token_pos_embed=True).validate()
    with_pos = build_model(cfg, seed=0).eval()
    without = build_model(ModelConfig(token_pos_embed=False).validate(), seed=0).eval()
    missing, unexpected = with_pos.load_state_dict(without.state_dict(), strict=False)
    assert missing == ["vision.token_pos_embed"] and not unexpected
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        diff = with_pos.encode_images(pixels, "rgb") - without.encode_images(pixels, "rgb")
    torch.testing.assert_close(diff[:, :cfg.num_patches], sincos_2d(cfg.grid_size, cfg.hidden_size).expand(2, -1, -1),
                               atol=1e-5, rtol=0)
    assert diff[:, cfg.num_patches:].abs().max() == 0


def test_configs_without_token_pos_embed_load_as_before():
    data = ModelConfig(token_pos_embed=True).to_dict()
    assert data.pop("token_pos_embed") is True
    old = ModelConfig.from_dict(data)
    assert old.token_pos_embed is False
    assert "vision.token_pos_embed" not in dict(build_model(old, seed=0).named_parameters())


def rgb_only_config(**changes) -> ModelConfig:
    """The tiny shape as RSUniVLM is built: no stems, no feature norm, no router."""
    return ModelConfig(sensors={"rgb": 3}, vision_stems=False, vision_feature_norm=False, router=False,
                       cnn_branch=False, vision_feature_layers=[-1], **changes).validate()


def test_models_without_stems_feature_norm_or_router_have_no_such_weights():
    model = build_model(rgb_only_config(), seed=0).eval()
    names = list(model.state_dict())
    assert not [n for n in names if n.startswith(("vision.stems.", "vision.feature_norm.", "router."))]
    pixels = torch.randn(2, 3, model.cfg.image_size, model.cfg.image_size)
    with torch.no_grad():
        # the encoder reads the RGB itself and the projector the last ViT layer's output, un-normalised
        h = model.vision.patch_embed(pixels).flatten(2).transpose(1, 2) + model.vision.pos_embed
        for block in model.vision.blocks:
            h = block(h)
        want = model.vision.proj2(torch.nn.functional.gelu(model.vision.proj1(h)))
        got = model.encode_images(pixels, "rgb")
    torch.testing.assert_close(got[:, :-1], want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got[:, -1], model.vision.newline.expand(2, -1), atol=0, rtol=0)
    with pytest.raises(KeyError, match="unknown sensor 'sar'"):
        model.encode_images(torch.randn(1, 2, model.cfg.image_size, model.cfg.image_size), "sar")
    with pytest.raises(ValueError, match="no instruction router"):
        model.route(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))
    counts = parameter_counts(model)
    assert counts["stored"] - counts["active"] == 2 * counts["per_expert"]


def test_rsunivlm_1b_preset_is_the_real_architecture():
    cfg = rsunivlm_1b_config()
    assert (cfg.vision_stems, cfg.vision_feature_norm, cfg.router, cfg.cnn_branch) == (False, False, False, False)
    assert cfg.sensors == {"rgb": 3} and cfg.image_preprocess == "siglip-square" and cfg.prompt_template == "qwen_1_5"
    assert (cfg.vision_layers, cfg.vision_feature_layers, cfg.vision_feature_dim) == (26, [-1], 1152)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (1e6, 1e-6, 32768)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size, cfg.tie_word_embeddings) == (14, 2, 151936, False)


def test_tied_lm_head_is_the_embedding_and_saves_once(tmp_path):
    model = build_model(rgb_only_config(tie_word_embeddings=True), seed=0).eval()
    assert model.lm_head.weight is model.embed_tokens.weight
    save_model(model, tmp_path, dtype=torch.float32)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "embed_tokens.weight" in f.keys()
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    torch.testing.assert_close(loaded.embed_tokens.weight, model.embed_tokens.weight, atol=0, rtol=0)


def test_new_config_fields_are_validated():
    cases = [({"vision_stems": False}, "vision_stems false needs sensors {'rgb': 3}"),
             ({"image_preprocess": "bilinear"}, "image_preprocess must be one of rsvlm, siglip-square, siglip-pad"),
             ({"image_preprocess": "siglip-square"}, "reads RGB images only"),
             ({"prompt_template": "chatml"}, "prompt_template must be one of rsvlm, qwen_1_5"),
             ({"router": "no"}, "router must be true or false"),
             ({"vision_feature_norm": 0}, "vision_feature_norm must be true or false"),
             ({"rope_theta": 0.0}, "rope_theta must be a positive number"),
             ({"max_position_embeddings": "32768"}, "max_position_embeddings must be a positive integer")]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
            ModelConfig.from_dict(change)


def test_configs_without_the_rsunivlm_fields_load_as_before(tmp_path):
    """config.json files written before vision_stems / vision_feature_norm / router / image_preprocess /
    prompt_template existed keep their stems, feature norm, router, preprocessing and template."""
    data = tiny_config().to_dict()
    for key in ("vision_stems", "vision_feature_norm", "router", "image_preprocess", "prompt_template"):
        data.pop(key)
    old = ModelConfig.from_dict(data)
    assert old == tiny_config()
    model = build_model(old, seed=0)
    assert set(model.vision.stems) == set(old.sensors) and model.router is not None
    assert isinstance(model.vision.feature_norm, torch.nn.LayerNorm)
