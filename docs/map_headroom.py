"""Where the demo CT CLIP's volume -> volume MAP@10 is lost (issue 12: target 0.45, oracle 0.573): print a table.

    .venv/bin/python docs/map_headroom.py [--checkpoint assets/ctclip] [--n 300]

On the held-out test split of ctclip-eval (seeds 900,000 + i, its cache cache/ctclip-demo/test, rendered when
missing), the checkpoint's image latents and zero-shot probabilities; then training.evaluate.map_at_k_read_labels:
a ranking by label vectors whose columns are the model's reading for some labels and the truth for the rest. No
labels read is the oracle; all read is a ranking by the 18-label reading alone; one label read at a time says what
reading that label costs the ranking. Nothing is written; the figures are quoted in docs/training.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.labels import LABELS  # noqa: E402
from engine.settings import training_cache_dir  # noqa: E402
from training.evaluate import auroc, map_at_k, map_at_k_read_labels  # noqa: E402


def main() -> None:
    from engine.models.ctclip import CTCLIP
    from training.ctclip_data import build_token_features, held_out_cache
    from training.eval_ctclip import encode_cache_images, zero_shot_probs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "assets" / "ctclip"))
    parser.add_argument("--n", type=int, default=300, help="test studies (ctclip-eval uses 300)")
    args = parser.parse_args()

    model = CTCLIP.from_pretrained(args.checkpoint).float().eval()
    preset = model.preprocessing
    root = training_cache_dir() / "ctclip-demo" / "test"
    cache = held_out_cache(root, preset, args.n)
    if preset.token_features:
        build_token_features(root, preset, n_masks=0, n_studies=args.n)
    image = encode_cache_images(model, cache, preset)
    probs, labels = zero_shot_probs(image, model), cache.label_matrix()

    k = "MAP@10"
    oracle = map_at_k_read_labels(probs, labels, ())[k]
    rows = [("image latent cosine (what ctclip-eval reports)", map_at_k(image.numpy(), labels)[k]),
            ("oracle: every label true", oracle),
            ("every label read (the reading alone)", map_at_k_read_labels(probs, labels, range(len(LABELS)))[k])]
    per_label = []
    for j, label in enumerate(LABELS):
        value = map_at_k_read_labels(probs, labels, (j,))[k]
        per_label.append((oracle - value, label, value, auroc(labels[:, j], probs[:, j]), labels[:, j].mean()))
    per_label.sort(reverse=True)
    weakest = [LABELS.index(label) for _, label, *_ in per_label[:4]]
    rows.append(("the 4 costliest labels read, the other 14 true",
                 map_at_k_read_labels(probs, labels, weakest)[k]))
    rows.append(("the other 14 read, the 4 costliest true",
                 map_at_k_read_labels(probs, labels, [j for j in range(len(LABELS)) if j not in weakest])[k]))
    print(f"| ranking ({len(labels)} held-out studies) | MAP@10 |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.3f} |")
    print("\n| label read (the rest true) | MAP@10 | cost against the oracle | zero-shot AUROC | prevalence |")
    print("|---|---|---|---|---|")
    for cost, label, value, label_auroc, prevalence in per_label:
        print(f"| {label} | {value:.3f} | {cost:.3f} | {label_auroc:.3f} | {prevalence:.2f} |")
    print(f"\nthe 4 costliest: {', '.join(LABELS[j] for j in weakest)}; "
          f"mean MAP@10 over queries, oracle {oracle:.3f}, random near 0.141")


if __name__ == "__main__":
    main()
