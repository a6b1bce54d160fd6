"""PruningCallback under a real Lightning Trainer, on tiny data."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

L = pytest.importorskip("lightning")

import softprune  # noqa: E402
from softprune.integrations.lightning import PruningCallback  # noqa: E402


def net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
    )  # fmt: skip


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = net()
        self.example_input_array = torch.zeros(1, 3, 12, 12)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, index):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


class HardWatch(L.Callback):
    """After every optimizer step: the largest weight of a hard filter (it must stay 0)."""

    def __init__(self, pruning: PruningCallback):
        self.pruning, self.largest, self.batches_with_hard = pruning, 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pruner = self.pruning.pruner
        for group, mask in zip(pruner.prunable, pruner.masks):
            if mask.hard.any():
                conv = pruner.model.get_submodule(group.producers[0])
                self.largest = max(self.largest, float(conv.weight[mask.hard].abs().max()))
                self.batches_with_hard += 1


def loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 3, 12, 12, generator=g), torch.randint(0, 3, (48,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=12)


def trainer(epochs, callbacks, **kwargs):
    return L.Trainer(
        max_epochs=epochs, callbacks=callbacks, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=kwargs.pop("checkpointing", False), **kwargs,
    )  # fmt: skip


def test_callback_prunes_keeps_hard_zeros_and_compacts_to_the_same_function(tmp_path):
    torch.manual_seed(0)
    module = Classifier()
    pruning = PruningCallback("hfp", 0.5, module="model", compact_to=tmp_path / "small.safetensors")
    watch = HardWatch(pruning)
    trainer(4, [pruning, watch]).fit(module, loader())
    pruner = pruning.pruner
    assert pruner.t == pruner.total_steps == 4
    # hard filters appeared after epoch 1 and stayed zero through Lightning's momentum steps
    assert watch.batches_with_hard >= 2 * 3 * 4 and watch.largest == 0.0
    small = pruning.compact_model
    assert [small[0].out_channels, small[3].out_channels] == [8, 8]
    x = torch.randn(5, 3, 12, 12)
    module.eval()
    small.eval()
    assert torch.allclose(small(x), module(x), atol=1e-6)
    loaded = softprune.load(tmp_path / "small.safetensors", net)
    assert torch.equal(loaded.eval()(x), small(x))


def test_callback_on_the_whole_module_with_steps_every_k_batches():
    torch.manual_seed(0)
    module = Classifier()
    pruning = PruningCallback("sfp", 0.25, every_steps=3)
    trainer(2, [pruning]).fit(module, loader())  # 8 optimizer steps: pruning steps at 3 and 6
    assert (pruning.pruner.total_steps, pruning.pruner.t) == (2, 2)
    assert pruning.pruner.last_verification["max_abs_diff"] < 1e-5
    assert sum(p.numel() for p in pruning.compact_model.parameters()) < sum(
        p.numel() for p in module.parameters()
    )


def test_resuming_a_lightning_checkpoint_resumes_the_pruner(tmp_path):
    def fit(epochs, ckpt=None):
        torch.manual_seed(0)
        module = Classifier()
        pruning = PruningCallback("sfp", 0.5, module="model")
        saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
        run = trainer(epochs, [pruning, saver], checkpointing=True, default_root_dir=tmp_path)
        run.fit(module, loader(), ckpt_path=ckpt)
        return pruning

    straight = fit(4)
    fit(2)
    resumed = fit(4, ckpt=tmp_path / "last.ckpt")
    assert resumed.pruner.t == 4 and resumed.pruner.history[0].t == 0  # history came back
    assert all(torch.equal(a.pruned, b.pruned) for a, b in zip(straight.pruner.masks, resumed.pruner.masks))


def test_a_bad_attribute_is_a_clear_error():
    pruning = PruningCallback("sfp", 0.5, module="backbone")
    with pytest.raises(softprune.SoftpruneError, match="no network of that name"):
        trainer(1, [pruning]).fit(Classifier(), loader())


class RankDump(L.Callback):
    """Each process writes its masks and hard filters' largest weight when fitting ends."""

    def __init__(self, pruning, folder):
        self.pruning, self.folder = pruning, folder

    def on_fit_end(self, trainer, pl_module):
        pruner = self.pruning.pruner
        largest = max(
            float(pruner.model.get_submodule(g.producers[0]).weight[m.hard].abs().max())
            for g, m in zip(pruner.prunable, pruner.masks)
        )
        weights = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        masks = torch.cat([m.hard for m in pruner.masks])
        torch.save(
            {"largest": largest, "weights": weights, "masks": masks},
            self.folder / f"{trainer.global_rank}.pt",
        )


@pytest.mark.slow
def test_ddp_strategy_takes_one_decision_for_all_processes(tmp_path):
    torch.manual_seed(0)
    module = Classifier()
    pruning = PruningCallback("hfp", 0.5, module="model")
    run = trainer(2, [pruning, RankDump(pruning, tmp_path)], strategy="ddp_spawn", devices=2)
    run.fit(module, loader())
    first, second = (torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1))
    assert torch.equal(first["masks"], second["masks"]) and int(first["masks"].sum()) == 16
    assert torch.equal(first["weights"], second["weights"])
    assert first["largest"] == second["largest"] == 0.0
