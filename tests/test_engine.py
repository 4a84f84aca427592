"""The public Engine facade."""

import torch

from ocrbatch import Engine


def test_an_engine_sets_torchs_threads_while_open_and_puts_them_back_on_close(tiny_model):
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    engine = Engine(tiny_model, quant="F32", threads=wanted, with_language=False)
    try:
        assert torch.get_num_threads() == wanted
    finally:
        engine.close()
    assert torch.get_num_threads() == before
