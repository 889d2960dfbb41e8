# The scripts here are started as processes by tests/test_multiprocess.py; pytest must not
# import them itself (--doctest-modules would): they are no tests.
collect_ignore_glob = ["*.py"]
