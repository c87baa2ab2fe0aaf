"""One frame through the pipeline: decode -> detect -> measure -> align -> gate -> warp -> stack.

``nightstack stack`` and the live daemon share every part, so a daemon session and a batch
stack of the same files in the same order with the same reference give the same result. The
halves are apart so the daemon can decode frame N+1 while frame N is being stacked:

- ``prepare.Preparer`` (one per process, configured once): hash, decode (in the isolated
  decoder process), calibrate, detect stars; where the sky is comes with each call (a
  session's learned sky mask);
- ``stacker.Stacker`` (one per session): choose or use the reference, align, gate, warp, add to
  the frame store and the live stack. It returns the ``records.FrameRecord`` that becomes one
  journal / report line; the caller counts it into its ``records.Tally``;
- ``finish.finish``: the end of a stack, the same for the batch and a session's close.
"""
