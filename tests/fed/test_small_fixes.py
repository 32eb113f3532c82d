"""Small rough edges a new user hit: the round plot's axis, the CLI's help."""
import pytest

from feddpa_fast.cli import main as cli_main
from feddpa_fast.evaluate import rounds_figure


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
