raise ImportError("fake nki: on sys.path for the SDK check only")
