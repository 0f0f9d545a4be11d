"""``model.compile``: the compiled training step equals eager on the tiny twins of every family.

The fast suite compiles with the ``aot_eager`` backend: dynamo captures each block's graph and AOTAutograd
builds its backward, exactly the path inductor takes, without inductor's C++ code generation (about 3 minutes
per tiny model on 2 cores). Inductor itself is exercised by experiments/benchmarks/bench_compile.py, which
checks the same equality before it times anything.
"""

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tests.conftest import REPO
from unimm.training.compile import CompileSettings, repeated_blocks

# one tiny experiment per LightningModule family
FAMILIES = ["uniir_clip_sf_tiny", "uniir_blip_ff_tiny", "vlm2vec_tiny", "unimur_tiny", "vlmo_tiny", "mlcd_tiny"]


def build(experiment, data_dir, tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={experiment}", f"paths.data_dir={data_dir}",
                                          f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run",
                                          "data.num_workers=0", *overrides])
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.attach_processor(instantiate(cfg.processor))
    torch.manual_seed(0)
    return instantiate(cfg.model), datamodule


def first_batch(datamodule):
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("experiment", FAMILIES)
def test_compiled_step_equals_eager(experiment, toy_data_dir, tmp_path):
    eager, datamodule = build(experiment, toy_data_dir, tmp_path)
    batch = first_batch(datamodule)
    # a second build, not a deepcopy: parameter hooks (FROMAGe's [RET]-row gradient mask) belong to their module
    compiled, _ = build(experiment, toy_data_dir, tmp_path)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_settings = CompileSettings(enabled=True, backend="aot_eager", fallback=False)
    compiled.configure_model()
    assert repeated_blocks(compiled), f"{experiment}: no transformer blocks found to compile"
    losses = []
    for module in (eager, compiled):
        module.train()
        torch.manual_seed(1)  # same dropout masks: compiled blocks draw from the same generator in the same order
        loss, _ = module.compute_loss(batch)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    g_eager, g_compiled = grads(eager), grads(compiled)
    assert g_eager.keys() == g_compiled.keys() and g_eager
    for name in g_eager:
        torch.testing.assert_close(g_compiled[name], g_eager[name], atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    # eval mode (no dropout, no grad), the mode in which evaluation embeds through the same compiled blocks
    with torch.no_grad():
        eager.eval(), compiled.eval()
        values = []
        for module in (eager, compiled):
            torch.manual_seed(2)  # PartialFC samples its negative centres
            values.append(module.compute_loss(batch)[0])
        torch.testing.assert_close(values[1], values[0], atol=1e-5, rtol=1e-5)

def test_model_compile_key_compiles_blocks_through_lightning(toy_data_dir, tmp_path):
    module, datamodule = build("uniir_clip_sf_tiny", toy_data_dir, tmp_path, "model.compile={backend:aot_eager}")
    assert module.compile_settings.enabled and module.compile_settings.backend == "aot_eager"
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule)
    blocks = repeated_blocks(module)
    assert blocks and all(getattr(block, "_compiled_call_impl", None) is not None for _, block in blocks)
    # parameter names unchanged (checkpoints, LoRA and optimizer groups see the same keys)
    assert all("_orig_mod" not in name for name in module.state_dict())


def test_compile_settings_reject_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys \\['backnd'\\]"):
        CompileSettings.parse({"backnd": "inductor"})
    assert CompileSettings.parse(True).backend == "inductor" and not CompileSettings.parse(False).enabled
