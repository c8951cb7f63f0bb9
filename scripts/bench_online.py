"""Step time of online ICASFTTrainer against SFTTrainer on the same batch and LoRA config (SmolLM2-135M, CPU).

Reports the stock step, the floor "stock step + one no-grad forward of the batch", and the online ICA step for
fixed and kNN demonstrations; every time is the median of `--repeats` steps on one batch, measured in one run.

    python scripts/bench_online.py [--batch-size 4] [--repeats 5]
"""

import argparse
import statistics
import time
import warnings

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from trl_ica import ICASFTConfig, ICASFTTrainer
from trl_ica.assets import default_model_path
from trl_ica.scenarios import noisy_gsm8k

warnings.filterwarnings("ignore")


def median_step(trainer, batch, repeats):
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this times step by step
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        trainer.training_step(model, dict(batch))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def median_forward(trainer, batch, repeats):
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            trainer.model(**inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--selections", nargs="+", default=["fixed", "knn"], choices=["fixed", "knn", "random"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, holdout, _ = noisy_gsm8k(n_train=16, n_holdout=16, n_test=1, noise=0.0, seed=0)
    train = train.remove_columns("corruption")
    common = dict(
        output_dir="/tmp/bench_online",
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        per_device_train_batch_size=args.batch_size,
        gradient_checkpointing=False,
        max_steps=1,
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")

    def model():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    stock = SFTTrainer(
        model(), args=SFTConfig(**common), train_dataset=train, processing_class=tokenizer, peft_config=lora
    )
    rows = [stock.train_dataset[i] for i in range(args.batch_size)]
    batch = stock._prepare_inputs(stock.data_collator(rows))
    t_stock = median_step(stock, batch, args.repeats)
    t_floor = t_stock + median_forward(stock, batch, args.repeats)
    print(
        f"batch {args.batch_size} x {batch['input_ids'].shape[1]} tokens, LoRA r=16 all-linear, {args.threads} threads"
    )
    print("| trainer | step (s) | / stock | / floor |")
    print("|---|---|---|---|")
    print(f"| SFTTrainer | {t_stock:.3f} | 1.00 | {t_stock / t_floor:.2f} |")
    print(f"| floor: stock step + no-grad forward | {t_floor:.3f} | {t_floor / t_stock:.2f} | 1.00 |")
    for selection in args.selections:
        ica = ICASFTTrainer(
            model(),
            args=ICASFTConfig(**common, ica_refresh="online", ica_demo_selection=selection, ica_max_length=2048),
            train_dataset=train,
            processing_class=tokenizer,
            holdout_dataset=holdout,
            peft_config=lora,
        )
        assert ica.ica.reuse_unconditioned.all()
        ica_rows = [ica.train_dataset[i] for i in range(args.batch_size)]
        ica_batch = ica._prepare_inputs(ica.data_collator(ica_rows))
        t = median_step(ica, ica_batch, args.repeats)
        print(
            f"| ICASFTTrainer online, {selection} demos | {t:.3f} | {t / t_stock:.2f} | {t / t_floor:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
