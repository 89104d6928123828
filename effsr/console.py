"""effsr's console: third-party messages that say nothing about an effsr run are dropped, the rest printed."""

from __future__ import annotations

import logging
import warnings

# Third-party messages that say nothing about an effsr run, dropped by exact message and module. Everything else
# (effsr's [effsr] lines, Lightning's and W&B's other notices, every other warning) is printed as before.
_NOISE_WARNINGS = (
    # torch deprecated LeafSpec; Lightning's own pytree helper still builds one (nothing effsr can change)
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
    # SRModule owns the uint8 -> float conversion on the device on purpose (it works with any loader, not only
    # SRDataModule); Lightning merely reports which of the two hooks it calls
    (UserWarning, r"You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a "
                  r"`LightningDataModule`", r"lightning\.pytorch\.trainer\.connectors\.data_connector"),
)
_LIGHTNING_TIP = "💡 Tip: For seamless cloud"  # Lightning's ads for litlogger / litmodels


class _DropLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LIGHTNING_TIP)


def quiet_known_noise() -> None:
    """Installs effsr's output filters (idempotent): the warnings of ``_NOISE_WARNINGS`` and Lightning's tips."""
    for category, message, module in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    tips_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(item, _DropLightningTips) for item in tips_logger.filters):
        tips_logger.addFilter(_DropLightningTips())
