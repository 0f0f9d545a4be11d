"""Released checkpoints of every family through config: `pretrained.path=<file>` on the same `evaluate(cfg)` /
`train(cfg)` the CLIs run. Each test writes a tiny checkpoint in the official layout (official key names and shapes,
written by the test's own renaming from a perturbed tiny model of the experiment), evaluates and takes a training
step from it, and checks that the weights landed (a parameter equals the file's tensor after the test's mapping)
and what the LoadReport says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict
from safetensors.torch import save_file

import unimm.eval.cli as eval_cli
import unimm.train as train_cli
from tests.conftest import REPO, run_cli, single_run_dir
from tests.test_uniir_checkpoint import _save_official, blip_official, clip_official
from unimm.checkpoints.released import REPORT_FILE
from unimm.data.toy import ensure_toy

# a small toy set (the same generator, fewer records): loading is what is tested, evaluation only has to run
MINI_TOY = {"seed": 0, "n_train_per_task": 40, "n_eval_queries": 12, "n_pool_images": 40}
MINI_OVERRIDES = [f"+data.prepare.{k}={v}" for k, v in MINI_TOY.items() if k != "seed"]


def probe_on(mini: Path) -> list[str]:
    """The linear probe of the cluster experiments on the small set (their training still reads the full one)."""
    return [f"eval.train.path={mini}/toy/train", f"eval.test.path={mini}/toy/eval/pools/toy_images", "eval.max_iter=50"]


@pytest.fixture(scope="module")
def mini_data_dir(tmp_path_factory) -> Path:
    """The small toy set; the cluster-discrimination experiments use the session's full toy set instead (their
    data preparation builds the cluster labels of the full set, shared with tests/test_cluster_disc_e2e.py)."""
    data_dir = tmp_path_factory.mktemp("mini")
    ensure_toy(data_dir / "toy", **MINI_TOY)
    return data_dir


def _compose(root: str, experiment: str, data_dir: Path, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(root, overrides=[f"+experiment={experiment}", f"paths.data_dir={data_dir}",
                                        f"paths.root_dir={out}", f"paths.output_dir={out}", "logger=none",
                                        "data.num_workers=0", *(MINI_OVERRIDES if data_dir.name.startswith("mini") else []),
                                        *overrides])


def _source(experiment: str, data_dir: Path, tmp: Path, *overrides: str):
    """The experiment's module with every float tensor moved away from its seeded initialisation (a "release")."""
    cfg = _compose("train", experiment, data_dir, tmp / "src", *overrides)
    module = instantiate(cfg.model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g).to(t.dtype))
    return module


def _run_both(experiment: str, data_dir: Path, tmp: Path, path: Path, probes: dict[str, torch.Tensor],
              *overrides: str, monkeypatch) -> dict:
    """Evaluate and take one training step from ``path``; ``probes`` (our key -> the file's tensor after mapping)
    must equal the module's tensors right after loading, on both paths. Returns the training run's report."""
    seen = {}

    def check(module, where):
        state = module.state_dict()
        for key, expected in probes.items():
            torch.testing.assert_close(state[key].float(), expected.float(), rtol=0, atol=0, msg=f"{where}: {key}")
        seen[where] = True

    real_released_run = eval_cli.released_run

    def released_run(cfg):
        run = real_released_run(cfg)
        check(run.module, "eval")
        return run

    real_apply = train_cli.apply_pretrained

    def apply_pretrained(module, cfg):
        report = real_apply(module, cfg)
        check(module, "train")
        return report

    monkeypatch.setattr(eval_cli, "released_run", released_run)
    monkeypatch.setattr(train_cli, "apply_pretrained", apply_pretrained)
    ecfg = _compose("eval", experiment, data_dir, tmp / "eval", f"pretrained.path={path}", *overrides)
    metrics = eval_cli.evaluate(ecfg)
    assert metrics and all(v == v for v in metrics.values())  # evaluated, no NaN
    eval_report = json.loads((tmp / "eval" / REPORT_FILE).read_text())
    tcfg = _compose("train", experiment, data_dir, tmp / "train", f"pretrained.path={path}", "trainer.max_steps=1",
                    "data.batch_size=16", *overrides)
    with open_dict(tcfg):
        tcfg.eval = None  # a training step only (the experiment's eval block would survive eval=none)
    train_cli.train(tcfg)
    assert (tmp / "train" / "checkpoints" / "last.ckpt").is_file()
    report = json.loads((tmp / "train" / REPORT_FILE).read_text())
    assert seen == {"eval": True, "train": True}
    assert report == eval_report and report["source"] == str(path)
    return report


# -- UniIR --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["clip_sf", "clip_ff", "blip_sf", "blip_ff"])
def test_uniir_pth(variant, mini_data_dir, tmp_path, monkeypatch):
    experiment = f"uniir_{variant}_tiny"
    source = _source(experiment, mini_data_dir, tmp_path)
    official = (clip_official if variant.startswith("clip") else blip_official)(source)
    path = _save_official(tmp_path / f"{variant}_large.pth", official)
    if variant.startswith("clip"):
        probes = {"encoder.text_model.encoder.layers.0.self_attn.k_proj.weight":
                  official["clip_model.transformer.resblocks.0.attn.in_proj_weight"].chunk(3)[1],
                  "encoder.visual_projection.weight": official["clip_model.visual.proj"].t()}
    else:
        probes = {"encoder.vision_model.embeddings.class_embedding": official["visual_encoder.cls_token"],
                  "encoder.vision_model.encoder.layers.1.self_attn.qkv.weight":
                  official["visual_encoder.blocks.1.attn.qkv.weight"]}
    if variant == "clip_ff":
        probes["fusion.t5_layers.block.0.layer.0.SelfAttention.q.weight"] = \
            official["t5_layers.block.0.layer.0.SelfAttention.q.weight"]
    report = _run_both(experiment, mini_data_dir, tmp_path, path, probes, monkeypatch=monkeypatch)
    assert report["loader"] == "unimm.checkpoints.uniir.load_uniir_checkpoint"
    assert set(report["mapped"]) == set(official) - set(report["dropped"])
    if variant == "clip_sf":
        assert report["dropped"] == {} and report["kept"] == {}
        assert report["reshaped"]["clip_model.logit_scale"] == [[], [1]]
    if variant == "clip_ff":
        assert list(report["kept"]) == ["encoder.text_projection.weight"]
    if variant.startswith("blip"):
        assert set(report["dropped"]) == {"text_encoder.embeddings.position_ids", "text_encoder_m.embeddings.position_ids"}


# -- VLMo ---------------------------------------------------------------------------------------------------------
VLMO_RENAMES = ((r"relative_position.table", "relative_position_bias_table"), ("heads.pooler.dense.", "pooler.dense."),
                ("heads.itm.", "itm_score.fc."), ("heads.mlm.", "mlm_score."))


def _vlmo_official(encoder) -> dict[str, torch.Tensor]:
    """The official vlmo_module.py state dict of ``encoder`` (renamed by the test), with the release's stale buffers."""
    official = {}
    for key, value in encoder.state_dict().items():
        if key.startswith("heads.itc."):
            name = key.removeprefix("heads.itc.")
            official[name if "scale" in name else f"itc_{name.removesuffix('.weight')}_proj.fc.weight"] = \
                value.reshape(()) if "scale" in name else value
            continue
        for ours, theirs in VLMO_RENAMES:
            key = key.replace(ours, theirs) if key.startswith(ours) else key
        official[key] = value.clone()
    official["relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    official["text_embeddings.position_ids"] = torch.arange(32)[None]
    return official


def test_vlmo_pt(mini_data_dir, tmp_path, monkeypatch):
    official = _vlmo_official(_source("vlmo_tiny", mini_data_dir, tmp_path).encoder)
    torch.save({"state_dict": official}, tmp_path / "vlmo_tiny.pt")
    probes = {"relative_position.table": official["relative_position_bias_table"],
              "heads.itc.logit_scale": official["logit_scale"].reshape(1),
              "transformer.blocks.0.attn.qkv.weight": official["transformer.blocks.0.attn.qkv.weight"]}
    report = _run_both("vlmo_tiny", mini_data_dir, tmp_path, tmp_path / "vlmo_tiny.pt",
                       {f"encoder.{k}": v for k, v in probes.items()}, monkeypatch=monkeypatch)
    assert set(report["dropped"]) == {"relative_position_index", "text_embeddings.position_ids"}
    assert report["reshaped"]["logit_scale"] == [[], [1]] and report["kept"] == {}
    assert len(report["mapped"]) == len(official) - 2


def test_vlmo_finetuning_experiments_build_the_encoder_from_pretrained_path(mini_data_dir, tmp_path):
    """The stage-3 / *_ft experiments build the encoder from pretrained.path (vlmo_from_checkpoint) and the
    vlmo_init loader returns that build's report instead of loading twice."""
    from unimm.checkpoints.released import apply_pretrained

    official = _vlmo_official(_source("vlmo_tiny", mini_data_dir, tmp_path).encoder)
    torch.save({"state_dict": official}, tmp_path / "vlmo.pt")
    as_ft = ["model.encoder._target_=unimm.checkpoints.vlmo.vlmo_from_checkpoint", "+model.encoder.path=${pretrained.path}",
             "+model.encoder.allow_missing=[]", "pretrained@model.pretrained=vlmo_init"]
    cfg = _compose("train", "vlmo_tiny", mini_data_dir, tmp_path / "run", f"pretrained.path={tmp_path / 'vlmo.pt'}", *as_ft)
    module = instantiate(cfg.model)
    report = apply_pretrained(module, cfg)
    assert report is module.encoder.load_report and report.source == str(tmp_path / "vlmo.pt")
    torch.testing.assert_close(module.encoder.relative_position.table, official["relative_position_bias_table"])
    cfg = _compose("train", "vlmo_tiny", mini_data_dir, tmp_path / "run", *as_ft)
    with pytest.raises(Exception, match="set pretrained.path"):  # no checkpoint to start from: named, not a TypeError
        instantiate(cfg.model)


# -- FROMAGe ------------------------------------------------------------------------------------------------------
def test_fromage_pruned_checkpoint(mini_data_dir, tmp_path, monkeypatch):
    trainable = _source("fromage_tiny", mini_data_dir, tmp_path).encoder.trainable_state()
    official = {"model.logit_scale": trainable["logit_scale"].reshape(()),  # fromage/prune_model_ckpt.py names
                "model.visual_embeddings.weight": trainable["prefix.weight"],
                "model.visual_embeddings.bias": trainable["prefix.bias"],
                "model.visual_fc.weight": trainable["image_head.weight"],
                "model.visual_fc.bias": trainable["image_head.bias"],
                "model.text_hidden_fcs.0.0.weight": trainable["text_head.0.weight"],
                "model.text_hidden_fcs.0.0.bias": trainable["text_head.0.bias"],
                "ret_input_embeddings.weight": trainable["ret_embedding"]}
    path = tmp_path / "pretrained_ckpt.pth.tar"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in official.items()}}, path)
    probes = {"encoder.prefix.weight": official["model.visual_embeddings.weight"],
              "encoder.logit_scale": official["model.logit_scale"].reshape(1)}
    report = _run_both("fromage_tiny", mini_data_dir, tmp_path, path, probes, monkeypatch=monkeypatch)
    assert report["loader"] == "unimm.checkpoints.frozen_lm.load_fromage"
    assert report["mapped"]["model.visual_fc.weight"] == "image_head.weight" and len(report["mapped"]) == 8
    assert report["reshaped"] == {"logit_scale": [[], [1]]}


# -- UNICOM -------------------------------------------------------------------------------------------------------
def _unicom_official(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """unicom/vision_transformer.py names (VisionTransformer: PatchEmbedding.proj, Mlp.fc1/fc2), fp16 as released."""
    renames = (("patch_embed.", "patch_embed.proj."), (".mlp.0.", ".mlp.fc1."), (".mlp.2.", ".mlp.fc2."))
    out = {}
    for key, value in ours.items():
        for a, b in renames:
            key = key.replace(a, b)
        out[key] = value.half() if value.is_floating_point() else value.clone()
    return out


def test_unicom_fp16_vit(toy_data_dir, mini_data_dir, tmp_path, monkeypatch):
    ours = _source("unicom_tiny", toy_data_dir, tmp_path).encoder.state_dict()
    official = _unicom_official(ours)
    assert "blocks.0.attn.qkv.bias" not in official  # UNICOM's qkv has no bias
    path = tmp_path / "FP16-ViT-tiny.pt"
    torch.save(official, path)
    probes = {"encoder.patch_embed.weight": official["patch_embed.proj.weight"],
              "encoder.blocks.1.mlp.2.weight": official["blocks.1.mlp.fc2.weight"],
              "encoder.feature.3.running_var": official["feature.3.running_var"]}
    report = _run_both("unicom_tiny", toy_data_dir, tmp_path, path, probes, *probe_on(mini_data_dir),
                       monkeypatch=monkeypatch)
    assert report["mapped"]["blocks.0.mlp.fc1.weight"] == "blocks.0.mlp.0.weight"
    assert report["cast"]["pos_embed"] == ["float16", "float32"]
    assert len(report["cast"]) == sum(v.is_floating_point() for v in official.values())
    assert report["dropped"] == {} and all(k.startswith("loss.") for k in report["kept"])


def test_unicom_rejects_unknown_and_missing_keys(toy_data_dir, tmp_path):
    from unimm.checkpoints.unicom import load_unicom_vit

    encoder = _source("unicom_tiny", toy_data_dir, tmp_path).encoder
    state = _unicom_official(encoder.state_dict())
    torch.save({**state, "head.weight": torch.zeros(3)}, tmp_path / "extra.pt")
    with pytest.raises(KeyError, match="head.weight"):
        load_unicom_vit(encoder, tmp_path / "extra.pt")
    torch.save({k: v for k, v in state.items() if k != "norm.bias"}, tmp_path / "short.pt")
    with pytest.raises(KeyError, match="norm.bias"):
        load_unicom_vit(encoder, tmp_path / "short.pt")


# -- MLCD ---------------------------------------------------------------------------------------------------------
def test_mlcd_hf_folder(toy_data_dir, mini_data_dir, tmp_path, monkeypatch):
    tower = _source("mlcd_tiny", toy_data_dir, tmp_path).encoder.model
    tower.save_pretrained(tmp_path / "mlcd-tiny")  # transformers' own layout, as DeepGlint-AI/mlcd-vit-*
    key = next(k for k in tower.state_dict() if ".layers.0." in k and k.endswith("q_proj.weight"))
    probes = {f"encoder.model.{key}": tower.state_dict()[key]}
    report = _run_both("mlcd_tiny", toy_data_dir, tmp_path, tmp_path / "mlcd-tiny", probes, *probe_on(mini_data_dir),
                       monkeypatch=monkeypatch)
    assert len(report["mapped"]) == len(tower.state_dict()) and report["dropped"] == {}


# -- VLM embedders ------------------------------------------------------------------------------------------------
# Phi-3.5-V's remote-code names (modeling_phi3_v.py), prefix by prefix: ours -> official
PHI_OFFICIAL = (("vision.img_processor.", "model.vision_embed_tokens.img_processor.vision_model."),
                ("vision.glb_GN", "model.vision_embed_tokens.glb_GN"), ("vision.sub_GN", "model.vision_embed_tokens.sub_GN"),
                ("vision.img_projection.", "model.vision_embed_tokens.img_projection."),
                ("language_model.", "model."))


def _phi_official(name: str) -> str:
    return next(theirs + name[len(ours):] for ours, theirs in PHI_OFFICIAL if name.startswith(ours))


def _phi_ours(name: str) -> str:
    return next(ours + name[len(theirs):] for ours, theirs in PHI_OFFICIAL if name.startswith(theirs))


def test_vlm2vec_phi35v_full_folder(mini_data_dir, tmp_path, monkeypatch):
    model = _source("vlm2vec_phi35v_tiny", mini_data_dir, tmp_path).backbone.model
    official = {_phi_official(k): v.clone() for k, v in model.state_dict().items()}
    official["lm_head.weight"] = torch.randn_like(official["model.embed_tokens.weight"])
    (tmp_path / "VLM2Vec-Full").mkdir()
    save_file(official, str(tmp_path / "VLM2Vec-Full" / "model.safetensors"))
    probes = {"backbone.model.language_model.layers.1.self_attn.qkv_proj.weight": official["model.layers.1.self_attn.qkv_proj.weight"],
              "backbone.model.vision.sub_GN": official["model.vision_embed_tokens.sub_GN"]}
    report = _run_both("vlm2vec_phi35v_tiny", mini_data_dir, tmp_path, tmp_path / "VLM2Vec-Full", probes,
                       "processor.num_crops=1", monkeypatch=monkeypatch)
    assert list(report["dropped"]) == ["lm_head.weight"] and report["kept"] == {}


def test_vlm2vec_phi35v_lora_adapter(mini_data_dir, tmp_path, monkeypatch):
    source = _source("vlm2vec_phi35v_tiny", mini_data_dir, tmp_path, "+model.lora={rank:2,alpha:4,use_dora:true}")
    source.backbone.model.save_pretrained(tmp_path / "ours-adapter")  # peft layout, our module names
    from safetensors.torch import load_file

    ours = load_file(str(tmp_path / "ours-adapter" / "adapter_model.safetensors"))
    prefix = "base_model.model."
    official = {}
    for key, value in ours.items():  # the official module paths (VLM2Vec-LoRA saves Phi3V remote-code names)
        module, _, tail = key.removeprefix(prefix).partition(".lora_")
        official[f"{prefix}{_phi_official(module)}.lora_{tail}"] = value
    folder = tmp_path / "VLM2Vec-LoRA"
    folder.mkdir()
    save_file(official, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text((tmp_path / "ours-adapter" / "adapter_config.json").read_text())
    key = next(k for k in official if ".lora_B." in k and "qkv_proj" in k)
    module, _, tail = key.removeprefix(prefix).partition(".lora_B.")
    our_key = f"{prefix}{_phi_ours(module)}.lora_B.default.{tail}"
    probes = {f"backbone.model.{our_key}": official[key]}
    report = _run_both("vlm2vec_phi35v_tiny", mini_data_dir, tmp_path, folder, probes, "processor.num_crops=1",
                       "+model.lora={rank:2,alpha:4,use_dora:true}", monkeypatch=monkeypatch)
    assert report["loader"] == "unimm.checkpoints.vlm.load_adapter_folder"
    assert len(report["mapped"]) == len(official) and any("lora_magnitude_vector" in k for k in report["mapped"])
    with pytest.raises(ValueError, match="lora_alpha"):  # adapter settings are checked against model.lora
        cfg = _compose("eval", "vlm2vec_phi35v_tiny", mini_data_dir, tmp_path / "bad", f"pretrained.path={folder}",
                       "+model.lora={rank:2,alpha:8,use_dora:true}")
        eval_cli.released_run(cfg)


def test_vlm2vec_qwen2vl_full_folder_legacy_layout(mini_data_dir, tmp_path, monkeypatch):
    model = _source("vlm2vec_tiny", mini_data_dir, tmp_path).backbone.model
    # transformers < 4.52 Qwen2VLForConditionalGeneration names, as VLM2Vec-Qwen2VL folders hold them
    official = {(f"model.{k.removeprefix('language_model.')}" if k.startswith("language_model.") else k): v.clone()
                for k, v in model.state_dict().items()}
    official["lm_head.weight"] = torch.randn_like(official["model.embed_tokens.weight"])
    (tmp_path / "qwen").mkdir()
    save_file(official, str(tmp_path / "qwen" / "model.safetensors"))
    probes = {"backbone.model.language_model.layers.0.mlp.up_proj.weight": official["model.layers.0.mlp.up_proj.weight"],
              "backbone.model.visual.blocks.0.attn.qkv.weight": official["visual.blocks.0.attn.qkv.weight"]}
    report = _run_both("vlm2vec_tiny", mini_data_dir, tmp_path, tmp_path / "qwen", probes, monkeypatch=monkeypatch)
    assert report["mapped"]["model.layers.0.mlp.up_proj.weight"] == "language_model.layers.0.mlp.up_proj.weight"


def test_e5v_llava_full_folder_legacy_layout(toy_data_dir, tmp_path, monkeypatch):
    # the full toy set: e5v_tiny's data preparation (toy NLI) builds it
    model = _source("e5v_tiny", toy_data_dir, tmp_path).backbone.model
    # older LlavaForConditionalGeneration names (language_model.model.*), as E5-V / LLaVA folders hold them
    official = {(f"language_model.model.{k.removeprefix('language_model.')}" if k.startswith("language_model.") else k):
                v.clone() for k, v in model.state_dict().items()}
    official["language_model.lm_head.weight"] = torch.randn_like(official["language_model.model.embed_tokens.weight"])
    (tmp_path / "e5v").mkdir()
    save_file(official, str(tmp_path / "e5v" / "model.safetensors"))
    key = "language_model.model.layers.1.self_attn.o_proj.weight"
    probes = {"backbone.model.language_model.layers.1.self_attn.o_proj.weight": official[key],
              "backbone.model.multi_modal_projector.linear_1.weight": official["multi_modal_projector.linear_1.weight"]}
    report = _run_both("e5v_tiny", toy_data_dir, tmp_path, tmp_path / "e5v", probes, monkeypatch=monkeypatch)
    assert list(report["dropped"]) == ["language_model.lm_head.weight"]


# -- one real CLI run ---------------------------------------------------------------------------------------------
def test_cli_evaluates_a_released_unicom_file(toy_data_dir, mini_data_dir, tmp_path):
    ours = _source("unicom_tiny", toy_data_dir, tmp_path).encoder.state_dict()
    official = _unicom_official(ours)
    torch.save(official, tmp_path / "FP16-ViT-tiny.pt")
    proc = run_cli("unimm.eval", "+experiment=unicom_tiny", f"paths.data_dir={toy_data_dir}",
                   f"paths.log_dir={tmp_path / 'logs'}", f"pretrained.path={tmp_path / 'FP16-ViT-tiny.pt'}",
                   "logger=none", "data.num_workers=0", *probe_on(mini_data_dir), cwd=tmp_path)
    run = single_run_dir(tmp_path / "logs", "unicom_tiny", "evals")
    report = json.loads((run / REPORT_FILE).read_text())
    assert report["counts"]["mapped"] == len(official)
    assert "loaded" in proc.stdout + proc.stderr and "unimm.checkpoints.unicom.load_unicom_vit" in proc.stdout + proc.stderr


def test_unimoco_llava_next_full_folder_current_layout(mini_data_dir, tmp_path, monkeypatch):
    module = _source("unimoco_tiny", mini_data_dir, tmp_path)
    # transformers >= 4.52 LlavaNextForConditionalGeneration names: everything under model., the head beside it
    official = {f"model.{k}": v.clone() for k, v in module.backbone.model.state_dict().items()}
    official["lm_head.weight"] = torch.randn_like(official["model.language_model.embed_tokens.weight"])
    (tmp_path / "unimoco").mkdir()
    save_file(official, str(tmp_path / "unimoco" / "model.safetensors"))
    tower = next(k for k in official if k.startswith("model.vision_tower.") and k.endswith("fc1.weight"))
    probes = {"backbone.model.image_newline": official["model.image_newline"],
              f"backbone.{tower}": official[tower]}
    report = _run_both("unimoco_tiny", mini_data_dir, tmp_path, tmp_path / "unimoco", probes, monkeypatch=monkeypatch)
    assert list(report["dropped"]) == ["lm_head.weight"]
    assert report["kept"] and all(k.startswith("completion.") for k in report["kept"])  # not in a backbone folder


# the released UNICOM models, as unicom/vision_transformer.py build_model: (image, patch, width, depth, heads, embedding)
UNICOM_RELEASES = {"unicom_vit_b32": (224, 32, 768, 12, 12, 512), "unicom_vit_b16": (224, 16, 768, 12, 12, 768),
                   "unicom_vit_l14": (224, 14, 1024, 24, 16, 768), "unicom_vit_l14_336": (336, 14, 1024, 24, 16, 768)}


def _unicom_release_shapes(image, patch, d, depth, heads, e) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official VisionTransformer state dict (written from the official module definitions)."""
    n = (image // patch) ** 2
    shapes = {"patch_embed.proj.weight": (d, 3, patch, patch), "patch_embed.proj.bias": (d,), "pos_embed": (1, n, d),
              "norm.weight": (d,), "norm.bias": (d,), "feature.0.weight": (d, d * n), "feature.2.weight": (e, d)}
    for i, width in ((1, d), (3, e)):
        shapes.update({f"feature.{i}.{k}": (width,) for k in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"feature.{i}.num_batches_tracked"] = ()
    for b in range(depth):
        p = f"blocks.{b}."
        shapes.update({p + "norm1.weight": (d,), p + "norm1.bias": (d,), p + "norm2.weight": (d,), p + "norm2.bias": (d,),
                       p + "attn.qkv.weight": (3 * d, d), p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
                       p + "mlp.fc1.weight": (4 * d, d), p + "mlp.fc1.bias": (4 * d,), p + "mlp.fc2.weight": (d, 4 * d),
                       p + "mlp.fc2.bias": (d,)})
    return shapes


@pytest.mark.parametrize("experiment", sorted(UNICOM_RELEASES))
def test_unicom_experiments_fit_the_released_shapes(experiment, tmp_path):
    """Each released size has an experiment whose encoder takes the release's every key and shape (built on the meta
    device: no memory, no init)."""
    from unimm.checkpoints.report import LoadReport
    from unimm.checkpoints.unicom import convert_unicom_state

    image, *_ = spec = UNICOM_RELEASES[experiment]
    cfg = _compose("train", experiment, tmp_path, tmp_path)
    assert cfg.processor.image_size == image
    with torch.device("meta"):
        encoder = instantiate(cfg.model.encoder)
        official = {k: torch.empty(s, dtype=torch.long if k.endswith("tracked") else torch.float16)
                    for k, s in _unicom_release_shapes(*spec).items()}
    report = LoadReport()
    convert_unicom_state(official, encoder.state_dict(), report)  # raises on any unmapped / missing key or shape
    assert len(report.mapped) == len(official) == len(encoder.state_dict())


def test_full_folder_into_a_dora_model_starts_equal_to_the_loaded_weights(mini_data_dir, tmp_path):
    """DoRA magnitudes are norms of the weights they were built on: after a full folder replaces those weights they
    are recomputed, so each adapted layer (B = 0) computes exactly the loaded layer."""
    from unimm.checkpoints.released import apply_pretrained

    model = _source("vlm2vec_phi35v_tiny", mini_data_dir, tmp_path).backbone.model
    (tmp_path / "full").mkdir()
    save_file({_phi_official(k): v.clone() for k, v in model.state_dict().items()}, str(tmp_path / "full" / "model.safetensors"))
    cfg = _compose("train", "vlm2vec_phi35v_tiny", mini_data_dir, tmp_path / "run", f"pretrained.path={tmp_path / 'full'}",
                   "+model.lora={rank:2,alpha:4,use_dora:true,init:true}")
    module = instantiate(cfg.model)
    report = apply_pretrained(module, cfg)
    layer = module.backbone.model.base_model.model.language_model.layers[0].self_attn.qkv_proj
    torch.testing.assert_close(layer.get_base_layer().weight, model.language_model.layers[0].self_attn.qkv_proj.weight)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.get_base_layer()(x), rtol=1e-5, atol=1e-5)
    assert any("lora_magnitude_vector" in k and "recomputed" in why for k, why in report.kept.items())
