"""The receiver's core: pure, no I/O and no clock of its own.

``migration.Migration`` is the state machine of one migration; its drivers
(``session.py`` on the event loop, ``reader_threads.py``) feed it decoded
events and the time and carry out the ``commands`` it returns. ``ledger``
is its memory accounting, ``snapshot`` the one view every output renders.
"""
