"""Model cards of the ICA trainers: TRL's card, naming the ICA method and citing ICA and the parent method."""

from __future__ import annotations

import os
import textwrap

from .. import seams
from ..embedded import EMBEDDED_BASE, is_embedded_model_dir

ICA_PAPER = {
    "title": "Holdout-Loss-Based Data Selection for LLM Finetuning via In-Context Learning",
    "id": "2510.14459",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @inproceedings{zhang2026holdout,
            title        = {{Holdout-Loss-Based Data Selection for LLM Finetuning via In-Context Learning}},
            author       = {Ling Zhang and Xianliang Yang and Juwon Yu and Park Cheonyoung and Lei Song and others},
            year         = 2026,
            booktitle    = {The Fourteenth International Conference on Learning Representations, ICLR 2026},
            eprint       = {arXiv:2510.14459},
        }"""),
}

SIMPO_PAPER = {
    "title": "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    "id": "2405.14734",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @inproceedings{meng2024simpo,
            title        = {{SimPO: Simple Preference Optimization with a Reference-Free Reward}},
            author       = {Yu Meng and Mengzhou Xia and Danqi Chen},
            year         = 2024,
            booktitle    = {Advances in Neural Information Processing Systems 37 (NeurIPS 2024)},
            eprint       = {arXiv:2405.14734},
        }"""),
}

ICA_SECTION = "## ICA weighting"


def base_model_name(config) -> str | None:
    """The Hub id of the base model, or None for a local folder that is not the embedded default."""
    path = seams.loaded_from(config)
    if not os.path.isdir(path):
        return path or None
    return EMBEDDED_BASE if is_embedded_model_dir(path) else None  # never converts: a card must not load models


def complete_card(
    path: str,
    *,
    method: str,
    parent: str,
    parent_paper: dict,
    base_model: str | None,
    options,
    args,
    scorer: str | None = None,
) -> None:
    """Add to the card TRL wrote at `path`: the real base model, the score's `options` ([`ICAScoringOptions`]), the
    run's weighting and refresh (`args`), the model that scored (`scorer`; None: the trained model), the parent
    method's citation and the files under `ica/`. The card is written whole (to a temporary file, then moved into
    place)."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    # PEFT's card data names the base model by its load path; a local folder is no base model on the Hub
    local = card.data.get("base_model")
    if base_model:
        card.data.base_model = base_model
    elif isinstance(local, str) and os.path.isdir(local):
        card.data.base_model = None
    if isinstance(local, str) and os.path.isdir(local) and card.data.get("tags"):
        card.data.tags = [t for t in card.data.tags if t != f"base_model:adapter:{local}"]
        if base_model:
            card.data.tags.append(f"base_model:adapter:{base_model}")
    card.text = card.text.replace("a fine-tuned version of [None](https://huggingface.co/None)", "a fine-tuned model")
    ica_dir = os.path.join(os.path.dirname(path), "ica")
    files = sorted(os.listdir(ica_dir)) if os.path.isdir(ica_dir) else []
    record = options.record()
    settings = {
        **{
            name: record[name]
            for name in ("ica_num_demos", "ica_demo_selection", "ica_score_form", "ica_reduction", "ica_demo_layout")
        },
        "ica_weighting": args.ica_weighting,
        "ica_refresh": args.ica_refresh,
        **({"ica_scoring_model": scorer} if scorer else {}),
    }
    score = "log p(y | k holdout demonstrations, x)" + (" - log p(y | x)" if options.form == "difference" else "")
    score += " per response token" if options.reduction == "mean" else ""
    lines = [
        "",
        ICA_SECTION,
        "",
        f"Trained with {method}: TRL's {parent} loss with each training example weighted by its ICA score, "
        f"{score} under {'the current model' if scorer is None else f'the scoring model `{scorer}`'} "
        f"([arXiv {ICA_PAPER['id']}](https://huggingface.co/papers/{ICA_PAPER['id']})), computed by trl_ica.",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| `{name}` | `{value}` |" for name, value in settings.items()],
        "",
    ]
    if files:
        lines += ["Scores, weights and plots of this run, under `ica/`:", "", *[f"- `ica/{f}`" for f in files], ""]
    if parent_paper.get("citation"):
        lines += [f"Cite {parent} ({parent_paper['title']}) as:", "", "```bibtex", parent_paper["citation"], "```", ""]
    text = card.text.split(ICA_SECTION)[0]  # written again after a save that rewrote the card's data
    card.text = text.rstrip("\n") + "\n" + "\n".join(lines)
    temporary = f"{path}.tmp"
    card.save(temporary)
    os.replace(temporary, path)
