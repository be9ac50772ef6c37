from PIL import Image
from safetensors.torch import load_file

from jobs.cli import main
from model.checkpoint import read_meta
from model.text_encoder import build_tiny_t5
from tests.conftest import run_cli
from tests.model.released_layout import PREFIX, debug_config, random_state, write_released


def test_import_sample_and_export_from_the_command_line(tmp_path, capsys):
    # A debug-sized release whose config names a local tiny T5 of the same width as its text input.
    t5 = build_tiny_t5(tmp_path / "t5", d_model=64, num_layers=1, num_heads=2)
    state = random_state(debug_config(), seed=0)
    write_released(tmp_path / "MiniT2I" / "minit2i-b-16", debug_config(llm=str(t5)), state)
    write_released(tmp_path / "MiniT2I" / "minit2i-l-16", debug_config(llm=str(t5)), random_state(debug_config(), seed=1))

    assert main(["weights", "import", str(tmp_path / "MiniT2I"), str(tmp_path / "b16"), "model=minit2i-b-16"]) == 0
    out = capsys.readouterr().out
    assert "preset debug, weights ema_0.99995" in out and f"dropped (stored, never used by the forward): {PREFIX}pooled_embedder.weight [128, 64]" in out
    assert read_meta(tmp_path / "b16")["text_encoder"]["name_or_path"] == str(t5)

    proc = run_cli("sample", f"checkpoint={tmp_path / 'b16'}", "prompts=[a red circle]", "sampler.steps=2",
                   "sampler.sampler=euler", f"out={tmp_path / 'grid.png'}")
    assert "wrote" in proc.stdout and Image.open(tmp_path / "grid.png").size[0] >= 32

    assert main(["weights", "export", str(tmp_path / "b16"), str(tmp_path / "back"), "format=diffusers"]) == 0
    exported = load_file(str(tmp_path / "back" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all((exported[k] == v).all() for k, v in state.items() if "embedder.weight" in k and "pooled" not in k)


def test_bad_sources_are_one_line_errors(tmp_path, capsys):
    write_released(tmp_path / "MiniT2I" / "minit2i-b-16", debug_config(), random_state(debug_config()))
    write_released(tmp_path / "MiniT2I" / "minit2i-l-16", debug_config(), random_state(debug_config()))
    assert main(["weights", "import", str(tmp_path / "MiniT2I"), str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith("holds the models minit2i-b-16, minit2i-l-16; choose one with model=NAME")
    assert main(["weights", "import", str(tmp_path / "nothing"), str(tmp_path / "w")]) == 2
    assert "nothing does not exist" in capsys.readouterr().err
    assert main(["weights", "export", str(tmp_path / "nothing"), str(tmp_path / "e")]) == 2
    assert "has no model.json" in capsys.readouterr().err
    assert not (tmp_path / "w").exists() and not (tmp_path / "e").exists()


def test_model_info_prints_the_exact_count_and_the_unused_stored_parameters(capsys):
    assert main(["model-info", "B/16", "text_dim=1024", "image_size=512"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 256,548,480 (256.5M), of which 58,496 are RMSNorm gains" in out
    assert "stored but unused in the released checkpoint layout: 1,574,400" in out
    assert "with them 258,122,880 (258.1M)" in out
