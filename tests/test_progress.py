"""The progress bar: redrawn in place on a terminal (no stale characters), one line per draw in a log file."""
import io

from sdjax.progress import ProgressBar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_the_bar_redraws_one_line_and_pads_over_longer_text():
    stream = Terminal()
    bar = ProgressBar(2, "euler", stream=stream, width=4)
    bar.show(1, "12.34 it/s")
    bar.show(2, "5 it/s")
    assert stream.getvalue() == "\reuler 1/2 [==  ] 12.34 it/s\reuler 2/2 [====] 5 it/s    \n"


def test_in_a_pipe_or_file_each_draw_is_its_own_line():
    stream = io.StringIO()
    bar = ProgressBar(2, "train", stream=stream, width=4)
    bar.show(1, "loss 0.5")
    bar.show(2, "loss 0.25")
    assert stream.getvalue() == "train 1/2 [==  ] loss 0.5\ntrain 2/2 [====] loss 0.25\n"
