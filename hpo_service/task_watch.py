"""What a trials-only loop (the SDK, ``hpo agent``) is waiting on that it cannot run, said
plainly once per study (issue 14.4)."""

from __future__ import annotations

import logging
import time

from hpo_service.client import ClientError, HPOClient

log = logging.getLogger("hpo.sdk")  # the SDK's logger: the loop that waits is the SDK's


class TaskWatch:
    """Says, once per study, what this loop is waiting on and cannot run (issue 14).

    The SDK and ``hpo agent`` train the user's own code, so they lease trials only: they
    cannot run the LR range test (it trains the service's VAE) nor evaluate a user's model
    (``final_evaluation`` rebuilds the service's VAE from a kept best model, which they never
    send). A study whose LR range test is pending gives them no trial until an ``hpo-worker``
    has run it; one whose final evaluation is pending stays so. Rather than wait in silence,
    after ``after_s`` of waiting the loop looks (one ``GET /v1/studies``) and logs what the
    user can do: start one ``hpo-worker --exit-when-idle``, or turn the step off.
    """

    def __init__(self, client: HPOClient, after_s: float = 30.0) -> None:
        self.client = client
        self.after_s = after_s
        self.told: set[tuple[str, str]] = set()
        self.waiting_since: float | None = None

    def worked(self) -> None:
        self.waiting_since = None

    def waited(self) -> list[str]:
        """Call after each empty lease answer; returns (and logs) the new explanations."""
        now = time.monotonic()
        if self.waiting_since is None:
            self.waiting_since = now
        if now - self.waiting_since < self.after_s:
            return []
        self.waiting_since = now  # look again after another ``after_s``
        try:
            studies = self.client.list_studies()
        except ClientError as error:
            log.debug("could not list studies: %s", error)
            return []
        said = []
        for info in studies:
            for step, attr, state in (
                ("lr_range_test", info.lr_range_test, "running"),  # trials held back
                ("final_evaluation", info.final_evaluation, "completed"),  # never comes
            ):
                key = (info.name, step)
                pending = (attr or {}).get("status") == "pending" and info.state == state
                if not pending or key in self.told:
                    continue
                self.told.add(key)
                what = "holds every trial back" if step == "lr_range_test" else "is pending"
                said.append(
                    f"study {info.name}: its {step} {what}, and this loop cannot run it (it "
                    "trains your code, not the service's VAE): start one `hpo-worker "
                    f"--exit-when-idle` beside it, or submit the study with `{step}.enabled: "
                    "false`"
                )
        for line in said:
            log.warning(line)
        return said
