"""The three components on their own: shapes, value conventions, config round trips, save → load bit-exact."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from tiny import gan_config, make_gan, make_text_encoder, make_vae, vae_config
from txt2img import GANConfig, GANGenerator, TextEncoder, VAEConfig, VAEDecoder, VAEEncoder


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


# -- configs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [vae_config(), gan_config(), VAEConfig(), GANConfig()])
def test_config_round_trips_through_json(config, tmp_path: Path) -> None:
    config.save(tmp_path, "Whatever")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["_class_name"] == "Whatever"
    assert type(config).from_dict(data) == config


def test_config_rejects_wrong_types_naming_the_key() -> None:
    with pytest.raises(ValueError, match="block_out_channels"):
        VAEConfig.from_dict({"block_out_channels": "wide"})
    with pytest.raises(ValueError, match="z_dim"):
        GANConfig.from_dict({"z_dim": 1.5})


def test_gan_config_needs_one_attention_flag_per_resolution() -> None:
    with pytest.raises(ValueError, match="one per resolution"):
        GANConfig(channels=(8, 8, 8), attention=(True,))


# -- VAE --------------------------------------------------------------------------------------------------


def test_vae_decoder_shapes_and_latent_scaling() -> None:
    vae = make_vae()
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        images = vae.decode(latents)
        # decode() divides by scaling_factor: raw latents through the network directly give the same.
        raw = vae.decoder(vae.post_quant_conv(latents / vae.config.scaling_factor))
    assert images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(images, raw)


def test_vae_decoder_applies_shift_factor() -> None:
    config = vae_config()
    config.shift_factor = 0.5
    torch.manual_seed(0)
    vae = VAEDecoder(config).eval()
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = vae.decoder(vae.post_quant_conv(latents / config.scaling_factor + 0.5))
        torch.testing.assert_close(vae.decode(latents), expected)


def test_vae_decoder_rejects_wrong_latent_channels() -> None:
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        make_vae().decode(torch.randn(1, 3, 8, 8))


def test_vae_encoder_inverts_shapes_and_scaling() -> None:
    torch.manual_seed(0)
    encoder = VAEEncoder(vae_config()).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, logvar = encoder.encode(images)
        latents = encoder.sample(images, generator=torch.Generator().manual_seed(0))
    assert mean.shape == logvar.shape == (2, 4, 8, 8)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        latents, (mean + torch.exp(0.5 * logvar) * noise) * encoder.config.scaling_factor
    )


# -- GAN --------------------------------------------------------------------------------------------------


def test_gan_output_shape_follows_requested_size() -> None:
    gan = make_gan()
    z = torch.randn(gan.noise_shape(3, 16, 16))
    text, pooled = torch.randn(3, 5, 32), torch.randn(3, 32)
    with torch.no_grad():
        assert gan(z, text, pooled).shape == (3, 4, 16, 16)
        assert gan(z, text, pooled, height=8, width=24).shape == (3, 4, 8, 24)
    with pytest.raises(ValueError, match="multiple of the generator's factor 2"):
        gan(z, text, pooled, height=9, width=16)


def test_gan_depends_on_noise_and_text() -> None:
    gan = make_gan()
    z = torch.randn(2, 8)
    text, pooled = torch.randn(2, 5, 32), torch.randn(2, 32)
    with torch.no_grad():
        base = gan(z, text, pooled)
        assert not torch.allclose(base, gan(torch.randn(2, 8), text, pooled))
        assert not torch.allclose(base, gan(z, torch.randn(2, 5, 32), pooled))
        assert not torch.allclose(base, gan(z, text, torch.randn(2, 32)))


def test_gan_attention_mask_hides_padding_tokens() -> None:
    gan = make_gan()
    z, pooled = torch.randn(1, 8), torch.randn(1, 32)
    text = torch.randn(1, 6, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    changed = text.clone()
    changed[:, 3:] = torch.randn(1, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(gan(z, text, pooled, mask), gan(z, changed, pooled, mask))
        assert not torch.allclose(gan(z, text, pooled), gan(z, changed, pooled))


def test_truncation_psi_zero_ignores_the_noise() -> None:
    gan = make_gan()
    text, pooled = torch.randn(1, 5, 32).expand(2, -1, -1), torch.randn(1, 32).expand(2, -1)
    with torch.no_grad():
        a = gan(torch.randn(2, 8), text, pooled, truncation_psi=0.0)
        untruncated = gan(torch.randn(2, 8), text, pooled)
    torch.testing.assert_close(a[0], a[1])
    assert not torch.allclose(untruncated[0], untruncated[1])


# -- text encoder -----------------------------------------------------------------------------------------


def test_text_encoder_outputs(tmp_path: Path) -> None:
    encoder = make_text_encoder(tmp_path)
    with torch.no_grad():
        out = encoder.encode(["a red circle", "hi"])
    assert out.hidden_states.shape == (2, 16, 32)
    assert out.pooled.shape == (2, 32)
    # BOS + 10 characters ("a", "red", "circle" char by char) + EOS; "hi": BOS + 2 + EOS
    assert out.attention_mask.sum(1).tolist() == [12, 4]


def test_text_encoder_clip_skip_uses_an_earlier_layer(tmp_path: Path) -> None:
    encoder = make_text_encoder(tmp_path)
    with torch.no_grad():
        full = encoder.encode("a red circle")
        encoder.config.clip_skip = 1
        skipped = encoder.encode("a red circle")
        ids, _ = encoder.tokenize(["a red circle"])
        states = encoder.model(ids, output_hidden_states=True).hidden_states
        expected = getattr(encoder.model, "text_model", encoder.model).final_layer_norm(states[-2])
    assert not torch.allclose(full.hidden_states, skipped.hidden_states)
    torch.testing.assert_close(skipped.hidden_states, expected)


def test_long_prompt_is_truncated_with_a_warning_showing_the_dropped_text(tmp_path: Path, caplog) -> None:
    encoder = make_text_encoder(tmp_path)
    prompt = "abcdefghijklmn xyz"  # 14 characters fit between BOS and EOS: "xyz" does not
    with caplog.at_level(logging.WARNING, logger="txt2img"):
        out = encoder.encode(prompt)
    assert out.hidden_states.shape[1] == 16
    assert "longer than" in caplog.text
    assert "xyz" in caplog.text.replace(" ", "")


# -- save / load ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [make_vae, make_gan], ids=["vae", "gan"])
def test_model_save_load_is_bit_exact(make, tmp_path: Path) -> None:
    model = make()
    model.save_pretrained(tmp_path / "m")
    loaded = type(model).from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    assert_same_state(model, loaded)
    assert not loaded.training


def test_vae_encoder_save_load_is_bit_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = VAEEncoder(vae_config())
    encoder.save_pretrained(tmp_path / "enc")
    assert_same_state(encoder, VAEEncoder.from_pretrained(tmp_path / "enc"))


def test_text_encoder_save_load_is_bit_exact(tmp_path: Path) -> None:
    encoder = make_text_encoder(tmp_path / "vocab")
    encoder.config.clip_skip = 1
    encoder.save_pretrained(tmp_path / "te")
    loaded = TextEncoder.from_pretrained(tmp_path / "te")
    assert loaded.config == encoder.config
    assert_same_state(encoder.model, loaded.model)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode("a red circle").hidden_states,
            encoder.encode("a red circle").hidden_states,
            rtol=0,
            atol=0,
        )


def test_text_encoder_folder_is_a_transformers_folder(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, CLIPTextModel

    encoder = make_text_encoder(tmp_path / "vocab")
    encoder.save_pretrained(tmp_path / "te")
    assert_same_state(encoder.model, CLIPTextModel.from_pretrained(tmp_path / "te"))
    ids, mask, _ = encoder.tokenizer(["ab"])
    assert AutoTokenizer.from_pretrained(tmp_path / "te")("ab").input_ids == ids[0][mask[0].bool()].tolist()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_native_clip_text_model_equals_transformers(act: str, tmp_path: Path) -> None:
    import transformers

    from txt2img.clip_text import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=16,
        hidden_act=act,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    reference = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.to_dict())).eval()
    reference.save_pretrained(tmp_path / "ref")
    ours = CLIPTextModel.from_folder(
        tmp_path / "ref", json.loads((tmp_path / "ref" / "config.json").read_text())
    )
    ids = torch.randint(2, 50, (3, 16))
    ids[:, 9] = 1  # end-of-text
    mask = (torch.arange(16) < 10).long().expand(3, -1)
    with torch.no_grad():
        for attention_mask in (None, mask):
            a = reference(ids, attention_mask=attention_mask, output_hidden_states=True)
            b = ours(ids, attention_mask=attention_mask, output_hidden_states=True)
            torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(b.pooler_output, a.pooler_output, atol=1e-5, rtol=1e-5)
            for x, y in zip(b.hidden_states, a.hidden_states, strict=True):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_native_clip_reads_the_diffusers_key_prefix(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    encoder = make_text_encoder(tmp_path / "vocab")
    encoder.save_pretrained(tmp_path / "te")
    path = tmp_path / "te" / "model.safetensors"
    state = load_file(path)
    state = {f"text_model.{k}": v for k, v in state.items()}
    state["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    save_file(state, path)
    assert_same_state(encoder.model, TextEncoder.from_pretrained(tmp_path / "te").model)


def test_text_encoder_reads_a_sibling_tokenizer_folder(tmp_path: Path) -> None:
    encoder = make_text_encoder(tmp_path / "vocab")
    encoder.model.save_pretrained(tmp_path / "sd" / "text_encoder")
    encoder.tokenizer.save_pretrained(tmp_path / "sd" / "tokenizer")
    loaded = TextEncoder.from_pretrained(tmp_path / "sd", subfolder="text_encoder")
    assert_same_state(encoder.model, loaded.model)


@pytest.mark.parametrize("dtype", [torch.float16, "bfloat16"])
def test_from_pretrained_casts_dtype(dtype, tmp_path: Path) -> None:
    make_vae().save_pretrained(tmp_path / "vae")
    vae = VAEDecoder.from_pretrained(tmp_path / "vae", dtype=dtype)
    expected = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
    assert {p.dtype for p in vae.parameters()} == {expected}


def test_torch_dtype_is_accepted_with_a_warning_and_refused_with_dtype(tmp_path: Path) -> None:
    make_gan().save_pretrained(tmp_path / "gan")
    with pytest.warns(FutureWarning, match="dtype="):
        gan = GANGenerator.from_pretrained(tmp_path / "gan", torch_dtype=torch.float16)
    assert next(gan.parameters()).dtype == torch.float16  # stored in float16 (computed in float32 on a CPU)
    with pytest.raises(ValueError, match="not both"):
        GANGenerator.from_pretrained(tmp_path / "gan", dtype=torch.float16, torch_dtype=torch.float16)


def test_dropped_text_is_shown_as_written_with_unknown_words_and_no_special_tokens() -> None:
    from txt2img.training.clip import build_word_tokenizer

    tokenizer = build_word_tokenizer(["a", "red", "circle", "on", "blue"], max_length=6)
    prompt = "A red circle on BLUE zebra-stripes, please"  # 4 words fit between BOS and EOS
    _, _, dropped = tokenizer([prompt, "a red circle"])
    assert dropped == ["BLUE zebra-stripes, please", ""]
