from consistent_diffusion.cli.main import main


def test_advise_uses_the_shipped_reference_report(capsys):
    assert main(["advise", "--need", "style,object"]) == 0
    out = capsys.readouterr().out
    assert "consistency" in out and "vs plain" in out


def test_advise_rejects_unknown_need(capsys):
    assert main(["advise", "--need", "colour"]) == 2
    assert "--need takes a comma list" in capsys.readouterr().err
