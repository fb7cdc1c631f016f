"""The log of a loop that retries the metadata store (Redis) through an outage: one line when the outage starts,
with its cause, the failed tries after it at debug level, and one line when the store answers again. A loop that
ran into anything else logs that itself, with its traceback: it is a bug, not an outage."""

from __future__ import annotations

import logging


class StoreOutageLog:
    """The outage log of one retrying loop; ``what`` names what the loop does (``"re-sending worker 0's watch
    list"``)."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.log = logger
        self.what = what
        self.num_failures = 0  # tries failed in a row

    def failed(self, err: BaseException) -> None:
        self.num_failures += 1
        if self.num_failures == 1:
            self.log.warning("%s failed: the metadata store (Redis) cannot be reached (%s: %s); trying again until it "
                             "answers", self.what, type(err).__name__, err)  # fmt: skip
        else:
            self.log.debug("%s failed, %d times in a row: %s", self.what, self.num_failures, err)

    def worked(self) -> None:
        if self.num_failures:
            self.log.warning("%s works again, after %d failed tries", self.what, self.num_failures)
        self.num_failures = 0
