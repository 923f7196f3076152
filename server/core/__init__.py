"""The engine core in its own process: ``process.py`` starts and watches it, ``engine_core.py`` serves the
engine inside it, ``client.py`` is the front end's facade over it, ``protocol.py`` what crosses between."""
