"""Two-GPU DDP check: the same planted-token run with 1 process and with torchrun --nproc_per_node=2
at the same global batch; writes benchmarks/results/ddp-check.json with both loss curves.

    python benchmarks/ddp_check.py --out-dir benchmarks/results
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from planted import planted_codebook, planted_tokens, write_shards  # noqa: E402

from lease.bench import write_record  # noqa: E402


def run(cmd: list[str], out: Path) -> list[dict]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-4000:])
    ranks = sorted({line.split("rank ")[1].split(" ")[0] for line in proc.stderr.splitlines() if "rank " in line})
    print(f"{' '.join(cmd[:4])}...: ranks seen {ranks}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], ranks, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/ddp-check")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--preset", default="vit_base")
    parser.add_argument("--samples", type=int, default=8192)
    args = parser.parse_args()
    work = Path(args.work)
    vq, disc, labels = planted_tokens(args.samples, 100, 256, 1024, 1, seed=0)
    write_shards(work / "shards", vq, disc, labels, per_shard=1024)
    np.save(work / "codebook.npy", planted_codebook(1024, 768, seed=1))
    cfg = {"preset": args.preset, "batch_size": args.batch_size, "max_steps": args.steps, "log_every": 10,
           "ckpt_every": args.steps, "optim": {"warmup_epochs": 1.0},
           "data": {"shards": str(work / "shards"), "codebook": str(work / "codebook.npy")}}
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    single, _, _ = run([sys.executable, "-m", "lease.train", "--config", str(work / "cfg.yaml"), "--out",
                        str(work / "single")], work / "single")
    ddp, ranks, stdout = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "lease.train", "--config", str(work / "cfg.yaml"), "--out", str(work / "ddp")],
                             work / "ddp")
    result = json.loads(stdout[stdout.index("{"):])
    diffs = [abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(single, ddp)]
    write_record("ddp-check", {"config": cfg, "single_process": single, "two_processes": ddp,
                               "ranks_logged": ranks, "ranks_in_sync": result.get("ranks_in_sync"),
                               "max_relative_loss_difference": max(diffs)}, args.out_dir)
    print(f"max relative loss difference {max(diffs):.4f}; ranks in sync: {result.get('ranks_in_sync')}")


if __name__ == "__main__":
    main()
