import subprocess
import sys

from consistent_diffusion.cli.main import main


def test_help_lists_generate(capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().out


def test_generate_help_teaches_with_examples(capsys):
    try:
        main(["generate", "--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    text = capsys.readouterr().out
    assert "--from-manifest" in text and "examples:" in text


def test_bad_input_is_one_line_error_and_exit_code_2(tiny_sd_folder, tmp_path, capsys):
    code = main(["generate", "--model", str(tiny_sd_folder), "--prompt", "x", "--steps", "-1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "error: steps must be a positive integer, got -1"
    assert not (tmp_path / "o").exists()


def test_missing_model_is_one_line_error(tmp_path, capsys):
    code = main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path / "o")])
    assert code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_python_dash_m_entry_point():
    completed = subprocess.run([sys.executable, "-m", "consistent_diffusion", "--version"], capture_output=True, text=True,
                               check=False)
    assert completed.returncode == 0 and "consistent-diffusion" in completed.stdout
