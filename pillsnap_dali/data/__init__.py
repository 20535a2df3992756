"""The data side: the AI Hub tree (scan), the synthetic tree (synth), the "is this file usable" checks at build
time (verify), the manifest build (build) and its file format (manifest), the class map (classmap), the JPEG
cache (cache) and the YOLO conversion for detection (yolo). Nothing here imports torch or DALI."""
