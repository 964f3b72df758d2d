"""SD 3 / FLUX.1 memory: the text encoders freed after the prompts are encoded (the default on a CPU) and read
again from their files only for a new prompt, the same images as with them kept; model and sequential offload
(accel/offload.py) on the flow networks, checked on a stand-in device as tests/test_memory.py does for the
U-Net; SD 3 run without T5 equal to diffusers' StableDiffusion3Pipeline(text_encoder_3=None)."""

import gc
import weakref

import pytest
import torch

import flow_reference as ref
import torchsd
from reference import max_rel_error
from torchsd.accel import enable_model_offload, enable_sequential_offload
from torchsd.checkpoints.io import CheckpointError
from torchsd.runtime import RuntimeOptions

RUN = dict(width=32, height=32, steps=2, seed=3, guidance_scale=4.5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    work = tmp_path_factory.mktemp("flow_memory")
    return {"sd3": ref.saved(ref.sd3_pipeline(work), work / "sd3"),
            "dev": ref.saved(ref.flux_pipeline(work), work / "dev")}


def load(folder, free: bool | None = None, **options):
    return torchsd.load_pipeline(folder, "cpu", torch.float32, runtime=RuntimeOptions(free_text_encoders=free),
                                 **options)


def count_reads(pipe) -> dict[str, int]:
    reads = dict.fromkeys(pipe.text_sources, 0)
    for role, read in list(pipe.text_sources.items()):
        def counted(role=role, read=read):
            reads[role] += 1
            return read()
        pipe.text_sources[role] = counted
    return reads


def test_freed_encoders_are_read_again_only_for_a_new_prompt_and_give_the_same_images(folders):
    kept = load(folders["sd3"], free=False)
    freed = load(folders["sd3"])  # the default on a CPU
    assert freed.free_text_encoders and not kept.free_text_encoders
    assert set(freed.text_encoders) == {"clip_l", "clip_g"}  # T5 is left for the first prompt
    reads = count_reads(freed)
    t5 = weakref.ref(freed.text_encoder("t5"))
    first = freed.generate("a cat", "zebra", **RUN)
    gc.collect()
    assert freed.text_encoders == {} and t5() is None  # dropped, nothing holds them
    assert reads == {"clip_l": 0, "clip_g": 0, "t5": 1}
    again = freed.generate("a cat", "zebra", **{**RUN, "seed": 4})  # the same prompts: their encodings are kept
    assert reads == {"clip_l": 0, "clip_g": 0, "t5": 1}
    other = freed.generate("a dog", "zebra", **RUN)  # a new prompt: each encoder read once for both prompts
    assert reads == {"clip_l": 1, "clip_g": 1, "t5": 2} and freed.text_encoders == {}
    for result, prompt, seed in ((first, "a cat", 3), (again, "a cat", 4), (other, "a dog", 3)):
        expected = kept.generate(prompt, "zebra", **{**RUN, "seed": seed})
        assert torch.equal(result.latents, expected.latents)
    assert set(kept.text_encoders) == {"clip_l", "clip_g", "t5"}


def test_freeing_is_asked_for_and_refused_where_it_does_not_apply(folders, capsys):
    from torchsd.cli import main

    with pytest.raises(ValueError, match="free_text_encoders .* is for SD 3 / FLUX.1"):
        torchsd.load_pipeline(None, "cpu", torch.float32, runtime=RuntimeOptions(free_text_encoders=True))
    assert main(["generate", "a cat", "--model", str(folders["dev"]), "--without-t5", "--size", "32x32"]) == 2
    assert "FLUX.1's context is T5's tokens" in capsys.readouterr().err


def test_sd3_without_t5_equals_stable_diffusion3_pipeline_without_text_encoder_3(folders):
    from diffusers import StableDiffusion3Pipeline

    pipe = load(folders["sd3"], without_t5=True)
    assert not pipe.has_text_encoder("t5") and pipe.tokenizers["t5"] is None
    reference = StableDiffusion3Pipeline.from_pretrained(folders["sd3"], text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        theirs = reference(prompt="a cat", negative_prompt="zebra", height=32, width=32, num_inference_steps=2,
                           guidance_scale=4.5, generator=[torch.Generator().manual_seed(3)],
                           output_type="latent").images
    mine = pipe.generate("a cat", "zebra", **RUN).latents
    assert max_rel_error(mine, theirs) < 1e-4
    with_t5 = load(folders["sd3"]).generate("a cat", "zebra", **RUN).latents
    assert max_rel_error(mine, with_t5) > 1e-3  # T5 did count


def networks_of(pipe) -> dict:
    return {**pipe.text_encoders, "transformer": pipe.transformer, "vae": pipe.vae.decoder}


def test_model_offload_keeps_one_flow_network_up_and_encoders_down_before_the_transformer(folders):
    expected = load(folders["sd3"], free=False).generate("a cat", "zebra", **RUN)
    pipe = load(folders["sd3"], free=False)
    offload = enable_model_offload(pipe, "cpu")  # "cpu" stands for the accelerator: copies are made all the same
    networks = networks_of(pipe)
    log = []

    def watch(name):
        def hook(module, args):
            up = {n: all(offload.is_uploaded(t) for t in [*m.parameters(), *m.buffers()])
                  for n, m in networks.items()}
            log.append((name, up))
        return hook

    for name, network in networks.items():  # after the offload's hooks: they see the state it computes in
        network.register_forward_pre_hook(watch(name))
    result = pipe.generate("a cat", "zebra", **RUN)
    # the uploaded weights are fresh copies, whose alignment may pick other kernels: equal up to rounding
    assert max_rel_error(result.latents, expected.latents) < 1e-5
    encoders = ["clip_l", "clip_g", "t5"]
    assert [name for name, _ in log] == encoders * 2 + ["transformer"] * 2 + ["vae"]  # prompt, negative, 2 steps
    for name, up in log:
        assert up[name] and not any(v for n, v in up.items() if n != name), (name, up)
    offload.remove()
    assert not any(offload.is_uploaded(p) for p in pipe.transformer.parameters())


def test_model_offload_of_a_pipeline_that_frees_its_encoders_leaves_them_out(folders):
    expected = load(folders["dev"], free=False).generate("a horse", **RUN)
    pipe = load(folders["dev"], free=True)
    offload = enable_model_offload(pipe, "cpu")
    assert not any(id(p) in offload.home for e in pipe.text_encoders.values() for p in e.parameters())
    assert all(id(p) in offload.home for p in pipe.transformer.parameters())
    result = pipe.generate("a horse", **RUN)
    assert max_rel_error(result.latents, expected.latents) < 1e-5 and pipe.text_encoders == {}


def test_sequential_offload_uploads_each_flow_layer_only_while_it_runs(folders):
    expected = load(folders["dev"], free=False).generate("a horse", **RUN)
    pipe = load(folders["dev"], free=False)
    offload = enable_sequential_offload(pipe, "cpu")
    seen = []
    for network in networks_of(pipe).values():
        for module in network.modules():
            tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            if tensors:
                module.register_forward_pre_hook(
                    lambda m, args, tensors=tensors: seen.append(all(offload.is_uploaded(t) for t in tensors)))
    result = pipe.generate("a horse", **RUN)
    assert max_rel_error(result.latents, expected.latents) < 1e-5
    assert len(seen) > 50 and all(seen)
    everything = [t for n in networks_of(pipe).values() for t in [*n.parameters(), *n.buffers()]]
    assert not any(offload.is_uploaded(t) for t in everything)


def test_a_part_of_an_all_in_one_file_is_read_by_itself(tmp_path):
    from safetensors.torch import save_file

    from torchsd.checkpoints.quantized import read_quantized

    t5 = "text_encoders.t5xxl.transformer."
    tensors = {"model.diffusion_model.x": torch.ones(2), t5 + "shared.weight": torch.full((3, 4), 2.0).to(
               torch.float8_e4m3fn), t5 + "shared.scale_weight": torch.tensor(0.1), t5 + "final_layer_norm.weight":
               torch.full((4,), 1.5, dtype=torch.float16), "text_encoders.clip_l.transformer.y": torch.zeros(1)}
    save_file(tensors, str(tmp_path / "all.safetensors"))
    part = read_quantized(tmp_path / "all.safetensors", keep=lambda k: k.startswith(t5), dtype=torch.bfloat16)
    assert sorted(part) == [t5 + "final_layer_norm.weight", t5 + "shared.weight"]
    # the fp8 weight stays fp8 with its float32 scale; the fp16 one is read into bf16
    assert torch.equal(part[t5 + "shared.weight"].dequantize(), torch.full((3, 4), 0.2))
    assert part[t5 + "shared.weight"].scale.dtype == torch.float32
    assert part[t5 + "final_layer_norm.weight"].dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="no such file"):
        read_quantized(tmp_path / "missing.safetensors", keep=lambda k: True)


def test_text_encoder_loras_reach_freed_encoders_and_keep_their_own_encodings(folders, tmp_path):
    """A LoRA with a CLIP-L part (diffusers' save_lora_weights) on a pipeline that frees its encoders: the part is
    applied to the encoder read again for the prompt, and an encoding made under it is not reused without it."""
    lora = ref.save_lora(ref.flux_pipeline(tmp_path), tmp_path / "lora")  # the same weights as the dev folder
    kept, freed = load(folders["dev"], free=False), load(folders["dev"])
    runs = [{"loras": [(lora, 1.0)]}, {}, {"loras": [(lora, 0.5)]}, {"loras": [(lora, 0.5)], "seed": 4}]
    for options in runs:
        mine = freed.generate("a horse", **{**RUN, **options})
        assert freed.text_encoders == {}
        assert torch.equal(mine.latents, kept.generate("a horse", **{**RUN, **options}).latents), options
