"""Hugging Face Trainer end to end with a patched model, on CPU (the kernels in the interpreter): fine-tune and
evaluate a tiny ElectraForSequenceClassification, save and reload it into a stock model, resume from a checkpoint,
and build it through model_init. One patched run is shared by the checks that only read its results."""

import copy

import pytest
import torch
from transformers import ElectraConfig, ElectraForSequenceClassification, Trainer, TrainingArguments, set_seed

import electra_triton
from electra_triton import fused_modules

SEED, SEQLEN, STEPS = 0, 8, 4
CONFIG = {"vocab_size": 64, "embedding_size": 32, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 1,
          "intermediate_size": 64, "max_position_embeddings": 16, "num_labels": 2, "hidden_dropout_prob": 0.0,
          "attention_probs_dropout_prob": 0.0}


class Examples(torch.utils.data.Dataset):
    """Variable-length token sequences (so batches are padded); the label says whether a small token id occurs."""

    def __init__(self, count: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, SEQLEN + 1, (count,), generator=generator)
        self.items = [torch.randint(3, 64, (int(n),), generator=generator) for n in lengths]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.items[i], "labels": int((self.items[i] < 12).any())}


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    ids = torch.ones(len(examples), SEQLEN, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n], mask[row, :n] = example["input_ids"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["labels"] for e in examples])}


def new_model(patch: bool = True) -> ElectraForSequenceClassification:
    model = ElectraForSequenceClassification(ElectraConfig(**CONFIG))
    return electra_triton.patch(model) if patch else model


def trainer(output_dir, model=None, model_init=None) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=5e-3, save_strategy="steps", save_steps=2, logging_steps=1, report_to="none", use_cpu=True,
        seed=SEED, disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
    )
    return Trainer(model=model, model_init=model_init, args=args, train_dataset=Examples(16, 1),
                   eval_dataset=Examples(8, 2), data_collator=collate)


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_params_close(ours, theirs, tol):
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=tol, atol=tol, msg=name)


@pytest.fixture(scope="module")
def patched_run(tmp_path_factory):
    """STEPS steps of a patched model with checkpoints every 2 steps, then evaluate."""
    output_dir = tmp_path_factory.mktemp("patched")
    set_seed(SEED)
    run = trainer(output_dir, model=new_model())
    initial = params(run.model)
    result = run.train()
    return {"trainer": run, "dir": output_dir, "initial": initial, "final": params(run.model), "result": result,
            "eval": run.evaluate()}


def test_train_and_evaluate_like_stock(patched_run, tmp_path):
    run = patched_run["trainer"]
    assert fused_modules(run.model), "Trainer must train the patched model itself"
    assert run.state.global_step == STEPS
    assert any(not torch.equal(patched_run["final"][k], v) for k, v in patched_run["initial"].items())
    set_seed(SEED)
    stock = trainer(tmp_path, model=new_model(patch=False))
    stock_result = stock.train()
    assert patched_run["result"].training_loss == pytest.approx(stock_result.training_loss, rel=1e-4)
    assert patched_run["eval"]["eval_loss"] == pytest.approx(stock.evaluate()["eval_loss"], rel=1e-3)
    assert_params_close(patched_run["final"], params(stock.model), tol=1e-3)


def test_saved_model_reloads_into_stock_transformers(patched_run, tmp_path):
    run = patched_run["trainer"]
    run.save_model(str(tmp_path))
    reloaded = ElectraForSequenceClassification.from_pretrained(tmp_path).eval()
    assert not fused_modules(reloaded)
    batch = collate([Examples(4, 3)[i] for i in range(4)])
    trained = run.model.eval()
    unpatched = electra_triton.unpatch(copy.deepcopy(trained))
    with torch.no_grad():
        stock_logits = reloaded(**batch).logits
        torch.testing.assert_close(stock_logits, unpatched(**batch).logits, rtol=0, atol=0)
        torch.testing.assert_close(stock_logits, trained(**batch).logits, rtol=1e-4, atol=1e-5)


def test_resume_from_checkpoint(patched_run, tmp_path):
    checkpoint = patched_run["dir"] / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists()
    set_seed(SEED + 1)  # another initialisation: the checkpoint's weights must replace it
    resumed = trainer(tmp_path, model=new_model())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert fused_modules(resumed.model) and resumed.state.global_step == STEPS
    assert_params_close(params(resumed.model), patched_run["final"], tol=1e-6)


def test_model_init(patched_run, tmp_path):
    built = []

    def model_init():
        built.append(new_model())
        return built[-1]

    run = trainer(tmp_path, model_init=model_init)
    run.train()
    assert run.model is built[-1] and fused_modules(run.model)
    # Trainer seeds before calling model_init: the same initial weights and batches as the patched run.
    assert_params_close(params(run.model), patched_run["final"], tol=1e-6)
