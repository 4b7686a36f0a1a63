"""Training-step time of our DiT against diffusers' PixArtTransformer2DModel, measured in one run.

    python benchmarks/dit_step.py [--hidden 256 --depth 8 --heads 4 --latent 32 --batch 4 --repeats 5]

Both models get the same width, depth, heads, patch size, text width and batch; ours runs with the
motion module off on images (T=1), which is the PixArt-equivalent configuration. Prints the ratio
(goal <= 1.15) and, with the motion module on, tokens per second at two frame counts.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import PixArtTransformer2DModel

from easyanimate.models.dit import EasyAnimateTransformer3DModel


def step_seconds(model, make_inputs, repeats: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(repeats + 1):
        inputs, target = make_inputs()
        began = time.perf_counter()
        out = model(**inputs).sample
        loss = torch.nn.functional.mse_loss(out[:, : target.shape[1]], target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:  # the first step pays one-off allocation costs
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--latent", type=int, default=32, help="latent side (pixels / 8)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--text-dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--frames", type=int, nargs=2, default=[2, 8], help="latent frame counts for the motion run")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(torch.get_num_threads())
    b, c, s = args.batch, 4, args.latent
    text = torch.randn(b, args.text_tokens, args.text_dim)
    mask = torch.ones(b, args.text_tokens, dtype=torch.long)

    ours = EasyAnimateTransformer3DModel(
        in_channels=c,
        patch_size=2,
        hidden_size=args.hidden,
        depth=args.depth,
        num_heads=args.heads,
        text_embed_dim=args.text_dim,
        motion_module=False,
        long_skips=True,
        base_latent_size=s,
    )
    pixart = PixArtTransformer2DModel(
        num_attention_heads=args.heads,
        attention_head_dim=args.hidden // args.heads,
        in_channels=c,
        out_channels=c,
        num_layers=args.depth,
        patch_size=2,
        sample_size=s,
        cross_attention_dim=args.hidden,
        caption_channels=args.text_dim,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )

    def ours_inputs():
        x = torch.randn(b, c, 1, s, s)
        return {
            "hidden_states": x,
            "timestep": torch.randint(0, 1000, (b,)),
            "encoder_hidden_states": text,
            "encoder_attention_mask": mask,
        }, torch.randn(b, c, 1, s, s)

    def pixart_inputs():
        x = torch.randn(b, c, s, s)
        return {
            "hidden_states": x,
            "timestep": torch.randint(0, 1000, (b,)),
            "encoder_hidden_states": text,
            "encoder_attention_mask": mask,
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }, torch.randn(b, c, s, s)

    # Interleave the two measurements so machine noise hits both alike.
    ours_t, pixart_t = [], []
    for _ in range(3):
        ours_t.append(step_seconds(ours, ours_inputs, args.repeats))
        pixart_t.append(step_seconds(pixart, pixart_inputs, args.repeats))
    o, p = min(ours_t), min(pixart_t)
    params = lambda m: sum(x.numel() for x in m.parameters()) / 1e6  # noqa: E731
    print(
        f"config: hidden {args.hidden}, depth {args.depth}, heads {args.heads}, latent {s}x{s}, batch {b}, "
        f"{(s // 2) ** 2} tokens/frame, threads {torch.get_num_threads()}"
    )
    print(f"ours   (motion off, images): {o * 1000:8.1f} ms/step  {params(ours):6.2f} M params")
    print(f"PixArtTransformer2DModel:    {p * 1000:8.1f} ms/step  {params(pixart):6.2f} M params")
    print(f"ratio ours / PixArt: {o / p:.3f}  (goal <= 1.15)")

    motion = EasyAnimateTransformer3DModel(
        in_channels=c,
        patch_size=2,
        hidden_size=args.hidden,
        depth=args.depth,
        num_heads=args.heads,
        text_embed_dim=args.text_dim,
        motion_module=True,
        base_latent_size=s,
    )
    for frames in args.frames:

        def video_inputs(frames=frames):
            return {
                "hidden_states": torch.randn(b, c, frames, s, s),
                "timestep": torch.randint(0, 1000, (b,)),
                "encoder_hidden_states": text,
                "encoder_attention_mask": mask,
            }, torch.randn(b, c, frames, s, s)

        seconds = step_seconds(motion, video_inputs, max(2, args.repeats // 2))
        tokens = b * frames * (s // 2) ** 2
        print(
            f"motion module on, {frames} latent frames: {seconds * 1000:8.1f} ms/step, {tokens / seconds:10.0f} tokens/s"
        )


if __name__ == "__main__":
    main()
