"""The language stage shared by threads: :class:`~ocrbatch.model.language.DecodeThread` (a Ray decode actor's)."""

from __future__ import annotations

import threading

import pytest

from ocrbatch.model.language import DecodeThread, LanguageModel


@pytest.fixture(scope="module")
def shared(engine_f32):
    """The tiny model's GGUF with two sequences, decoded by one thread for whoever submits."""
    model = LanguageModel(engine_f32.gguf_path, n_ctx=engine_f32.context_size(2, 48), n_seq_max=2, n_threads=1)
    decoder = DecodeThread(model)
    yield decoder
    decoder.close()
    model.close()


@pytest.fixture(scope="module")
def requests(engine_f32, test_images):
    """Greedy requests for three pages, and what ``generate`` makes of each alone."""
    encoded = engine_f32.vision.encode(test_images[:3])

    def make():
        return [engine_f32.request(item, "OCR:", max_tokens=40) for item in encoded]

    alone = [engine_f32.language.generate([request])[0].token_ids for request in make()]
    return make, alone


def test_a_request_submitted_while_another_decodes_joins_it_and_each_gets_its_own_tokens(shared, requests):
    make, alone = requests
    first, second, _ = make()
    events = []
    started = threading.Event()
    for name, request in (("first", first), ("second", second)):
        request.stop_ids = ()  # every request runs its 40 tokens, so they overlap for sure
        request.on_token = lambda token, name=name: (events.append(name), started.set())
    future = shared.submit(first)
    assert started.wait(30)
    # From another thread, once the first is decoding: a Ray actor's calls each bring their own page.
    later = []
    caller = threading.Thread(target=lambda: later.append(shared.submit(second)))
    caller.start()
    caller.join()
    results = [future.result(60), later[0].result(60)]
    assert [len(r.token_ids) for r in results] == [40, 40] and not any(r.error for r in results)
    # The second request's tokens came while the first's were still coming: one decode step served both.
    assert events.index("second") < len(events) - 1 - events[::-1].index("first")
    # ... and sharing the steps changed neither one's greedy tokens.
    for result, own in zip(results, alone[:2]):
        assert result.token_ids[:len(own)] == own


def test_a_fault_the_scheduler_cannot_pin_fails_only_the_request_that_causes_it(shared, requests):
    make, alone = requests
    culprit, *others = make()

    def broken(token):
        raise RuntimeError("callback broke")

    culprit.on_token = broken  # raised inside a joint decode step, not an error llama.cpp reports
    futures = [shared.submit(request) for request in (culprit, *others)]
    results = [future.result(120) for future in futures]
    assert results[0].error == "language model failed (RuntimeError: callback broke)"
    assert [r.token_ids for r in results[1:]] == alone[1:] and not any(r.error for r in results[1:])
    # The thread goes on decoding afterwards.
    [again] = make()[:1]
    assert shared.submit(again).result(60).token_ids == alone[0]
