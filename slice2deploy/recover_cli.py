"""``slice2deploy recover``: the command line of :mod:`slice2deploy.recover`."""

from __future__ import annotations

import argparse

from .recover import Method, RecoverConfig, recover


def add_recover_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``slice2deploy recover`` on a subparsers object."""
    parser = subparsers.add_parser(
        "recover", help="recover a slice's quality: distillation from the dense model and/or LoRA, merged back",
        description="Train a sliced checkpoint against its dense source (logit distillation, optionally layer "
                    "outputs) and/or with LoRA adapters on next-token loss, then merge the adapters so the output is "
                    "the same kind of checkpoint as the input. Resumable: rerun the same command after an "
                    "interruption.")
    parser.add_argument("model", help="a sliced checkpoint directory (slice2deploy slice)")
    parser.add_argument("-o", "--output", required=True, help="output directory (must be empty or absent)")
    what = parser.add_argument_group("what is trained")
    what.add_argument("--method", default="kd", choices=[m.value for m in Method],
                      help="kd: all weights on the distillation loss (default); lora: LoRA adapters on next-token "
                           "loss (the SliceGPT paper); kd+lora: LoRA adapters on the distillation loss")
    what.add_argument("--teacher", default=None, help="dense teacher (default: the source model the slice records)")
    what.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default 1)")
    what.add_argument("--kd-weight", type=float, default=None, help="weight of the KL term (default by method)")
    what.add_argument("--ce-weight", type=float, default=None, help="weight of next-token loss (default by method)")
    what.add_argument("--hidden-weight", type=float, default=0.0,
                      help="weight of the layer-output loss through learned per-layer maps (default 0: off)")
    what.add_argument("--lora-rank", type=int, default=32, help="LoRA rank r (default 32, as the SliceGPT paper)")
    what.add_argument("--lora-alpha", type=float, default=64.0, help="LoRA scaling alpha (default 64)")
    data = parser.add_argument_group("data and budget")
    data.add_argument("--data", default="builtin", help="builtin (its calibration articles only), a local "
                      ".txt/.jsonl file, or a datasets name (wikitext2, c4, ptb, alpaca)")
    data.add_argument("--tokens", type=int, default=200_000, help="training budget in tokens (default 200000)")
    data.add_argument("--seqlen", type=int, default=256, help="tokens per packed sequence (default 256)")
    data.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch (default 4)")
    data.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    data.add_argument("--seed", type=int, default=0, help="seed of the window order and LoRA init (default 0)")
    optim = parser.add_argument_group("optimizer and runtime")
    optim.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-5 kd, 2e-4 LoRA)")
    optim.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps (default 0.1)")
    optim.add_argument("--kl-chunk", type=int, default=128, help="positions per logits chunk (memory bound)")
    optim.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    optim.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                       help="compute dtype (auto: bfloat16 on a CUDA GPU that has it, float32 otherwise)")
    optim.add_argument("--checkpoint-every", type=int, default=50, help="steps between resumable checkpoints")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.set_defaults(handler=run_recover_command)


def run_recover_command(args: argparse.Namespace) -> int:
    """Handler of ``slice2deploy recover``: build the config, run :func:`recover`, print a summary."""
    from .checkpoint import read_manifest

    config = RecoverConfig(method=args.method, teacher=args.teacher, data=args.data, tokens=args.tokens,
                           seqlen=args.seqlen, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                           warmup=args.warmup, temperature=args.temperature, kd_weight=args.kd_weight,
                           ce_weight=args.ce_weight, hidden_weight=args.hidden_weight, lora_rank=args.lora_rank,
                           lora_alpha=args.lora_alpha, kl_chunk=args.kl_chunk, seed=args.seed, device=args.device,
                           dtype=args.dtype, checkpoint_every=args.checkpoint_every)
    out = recover(args.model, config, args.output, overwrite=args.overwrite)
    info = read_manifest(out)["recovery"]
    print(f"saved {out} ({config.method.value}: {info['steps']} steps, {info['tokens']:,} tokens, "
          f"{info['seconds']:.0f} s); loss {info['loss']['first']:.4f} -> {info['loss']['last']:.4f}")
    return 0
