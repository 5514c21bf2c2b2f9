"""The engine: runs deliveries of stages (``runner``), delayed work (``scheduler``), lost-work
recovery (``reaper``), all over the services one process shares (``services``)."""
