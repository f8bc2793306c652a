"""Training under torchrun: DistributedDataParallel keeps the replicas identical while each rank draws its own
data, rank 0 alone writes, resuming works; and one process trains exactly as it does without any of it.

The 2-process test runs this file under ``torchrun --nproc_per_node 2`` (gloo, CPU): see ``__main__`` below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from txt2img import distributed
from txt2img.gan import GANConfig, GANGenerator
from txt2img.training.baseline import BaselineTrainingConfig, TextToLatentGaussian, train_baseline
from txt2img.training.clip import (
    CLIPTrainingConfig,
    LatentCLIP,
    TextEncoderShape,
    build_text_encoder,
    train_latent_clip,
)
from txt2img.training.gan_training import (
    GANTrainingConfig,
    GANTrainingState,
    TrainingDiverged,
    check_divergence,
    make_state,
    train_gan,
)
from txt2img.training.recipe import SAMPLE_PROMPTS, image_batches, vocabulary
from txt2img.training.vae_training import VAETrainingConfig, train_vae
from txt2img.vae import VAEConfig

GAN = GANConfig(
    z_dim=8,
    w_dim=16,
    text_dim=32,
    pooled_dim=32,
    channels=(16, 8),
    attention=(True, False),
    attention_heads=2,
    const_size=8,
)  # 16 × 16 latents


def latent_batches(entropy: list[int], batch_size: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Batches of one small data set (the same on every rank), drawn by this rank's own generator."""
    latents = torch.randn(32, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(distributed.rank_entropy(entropy))
    while True:
        index = rng.integers(len(latents), size=batch_size)
        yield latents[torch.from_numpy(index)], [SAMPLE_PROMPTS[i % 6] for i in index]


def train_all(out: Path) -> dict[str, torch.Tensor]:
    """Two steps of every training loop on tiny settings, each rank on its own data; the GAN stage then
    resumes from its checkpoint for two more. Returns every trained tensor by name."""
    out.mkdir(parents=True, exist_ok=True)
    vae_config = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=64)
    images = image_batches(np.random.default_rng(distributed.rank_entropy([0, 1])), 2)
    encoder, decoder = train_vae(vae_config, VAETrainingConfig(steps=2), images, progress=False)

    text_encoder = build_text_encoder(vocabulary(), TextEncoderShape(hidden_size=32, layers=1, heads=2))
    clip = LatentCLIP(text_encoder, 4, 16)
    clip = train_latent_clip(clip, CLIPTrainingConfig(steps=2), latent_batches([0, 3], 4), progress=False)

    torch.manual_seed(0)
    baseline = TextToLatentGaussian(32, 4, 16, width=16)
    baseline = train_baseline(
        baseline,
        text_encoder,
        BaselineTrainingConfig(steps=2, batch_size=4),
        latent_batches([0, 5], 4),
        progress=False,
    )

    def write_sample(generator: GANGenerator, path: Path) -> None:
        (out / f"sample-by-rank-{distributed.rank()}").touch()

    training = GANTrainingConfig(
        steps=2, batch_size=4, r1_every=2, sample_every=2, checkpoint_every=2, discriminator_width=8
    )
    torch.manual_seed(0)
    state = make_state(GANGenerator(GAN), training, size=16)
    train_gan(
        state, training, latent_batches([0, 4], 4), clip, out_dir=out, sample_fn=write_sample, progress=False
    )
    torch.manual_seed(0)
    training.steps = 4
    state = make_state(GANGenerator(GAN), training, size=16)
    distributed.barrier()  # rank 0 writes the checkpoint: the others wait for it (a new launch need not)
    state.load(out / "checkpoint")
    train_gan(
        state, training, latent_batches([0, 4], 4), clip, out_dir=out, sample_fn=write_sample, progress=False
    )

    tensors = {"vae.scale_shift": torch.tensor([encoder.config.scaling_factor, encoder.config.shift_factor])}
    modules = {
        "vae.encoder": encoder,
        "vae.decoder": decoder,
        "clip": clip,
        "baseline": baseline,
        "gan.generator": state.generator,
        "gan.generator_ema": state.generator_ema,
        "gan.discriminator": state.discriminator,
    }
    for prefix, module in modules.items():
        tensors.update({f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    for name, optimizer in (("gan.opt_g", state.opt_g), ("gan.opt_d", state.opt_d)):
        for index, moments in optimizer.state_dict()["state"].items():
            tensors.update({f"{name}.{index}.{k}": v.clone() for k, v in moments.items()})
    return tensors


def assert_same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    differ = [k for k in first if not torch.equal(first[k], second[k])]
    assert not differ, f"{len(differ)} of {len(first)} tensors differ, e.g. {differ[:3]}"


def test_each_rank_draws_its_own_numbers(monkeypatch) -> None:
    draws = set()
    for rank in range(8):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        torch_draw = torch.randn(3, generator=torch.Generator().manual_seed(distributed.rank_seed(5) + 10))
        numpy_draw = np.random.default_rng(distributed.rank_entropy([5, 4])).random(3)
        draws.add((tuple(torch_draw.tolist()), tuple(numpy_draw.tolist())))
        if rank == 0:  # as a process alone
            assert distributed.rank_seed(5) == 5 and distributed.rank_entropy([5, 4]) == [5, 4]
    assert len({torch_draw for torch_draw, _ in draws}) == len({numpy_draw for _, numpy_draw in draws}) == 8


def test_one_process_trains_exactly_as_without_a_process_group(tmp_path: Path) -> None:
    plain = train_all(tmp_path / "plain")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert isinstance(
            distributed.data_parallel(torch.nn.Linear(1, 1)), torch.nn.parallel.DistributedDataParallel
        )
        wrapped = train_all(tmp_path / "group")
    finally:
        dist.destroy_process_group()
    assert_same(plain, wrapped)
    assert not isinstance(
        distributed.data_parallel(torch.nn.Linear(1, 1)), torch.nn.Module
    )  # a plain call again


def test_two_processes_keep_identical_replicas_of_distinct_data(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file

    rank0, rank1 = (
        load_file(str(tmp_path / "rank-0.safetensors")),
        load_file(str(tmp_path / "rank-1.safetensors")),
    )
    assert_same(rank0, rank1)
    drawn = [json.loads((tmp_path / f"drawn-rank-{r}.json").read_text()) for r in (0, 1)]
    assert all(
        drawn[0][k] != drawn[1][k] for k in drawn[0]
    )  # each rank its own batches: only the sync keeps them equal
    torch.manual_seed(0)
    untrained = GANGenerator(GAN).state_dict()
    assert not any(torch.equal(rank0[f"gan.generator.{k}"], v) for k, v in untrained.items())
    written = sorted(p.name for p in tmp_path.iterdir() if "-by-rank-" in p.name)
    assert written == ["checkpoint-by-rank-0", "sample-by-rank-0"]  # rank 0 alone writes
    assert (
        json.loads((tmp_path / "checkpoint" / "state.json").read_text())["extra"]["step"] == 4
    )  # resumed to 4
    stops = [json.loads((tmp_path / f"stops-rank-{r}.json").read_text()) for r in (0, 1)]
    assert stops[0] == stops[1] == {"any_rank": [True, False], "diverged": True}  # rank 1's NaN stops both


if __name__ == "__main__":  # a rank of torchrun --nproc_per_node N tests/test_distributed.py OUT
    from safetensors.torch import save_file

    out = Path(sys.argv[1])
    save = GANTrainingState.save

    def recorded_save(self: GANTrainingState, folder: str | os.PathLike) -> None:
        (out / f"checkpoint-by-rank-{distributed.rank()}").touch()
        save(self, folder)

    GANTrainingState.save = recorded_save  # type: ignore[method-assign]
    with distributed.process_group("gloo"):
        rank = distributed.rank()
        # Rank 1's NaN stops both ranks. Checked first: these small all-reduces, run just before the group
        # was destroyed, aborted gloo's teardown now and then (2 runs in 8).
        try:
            check_divergence({"d": torch.tensor(float("nan") if rank == 1 else 1.0)}, 1, 1000.0, "none")
            diverged = False
        except TrainingDiverged:
            diverged = True
        stops = {
            "any_rank": [distributed.any_rank(rank == 1), distributed.any_rank(False)],
            "diverged": diverged,
        }
        (out / f"stops-rank-{rank}.json").write_text(json.dumps(stops))
        tensors = train_all(out)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"rank-{rank}.safetensors"))
        drawn = {
            "vae": float(
                next(image_batches(np.random.default_rng(distributed.rank_entropy([0, 1])), 2)).sum()
            ),
            "gan": float(next(latent_batches([0, 4], 4))[0].sum()),
            "gan_noise": float(
                torch.randn(
                    4, GAN.z_dim, generator=torch.Generator().manual_seed(distributed.rank_seed(0))
                ).sum()
            ),
        }
        (out / f"drawn-rank-{rank}.json").write_text(json.dumps(drawn))
