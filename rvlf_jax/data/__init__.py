"""Dataset readers (poses, keypoints, annotations, video) and the SynthSign generator."""
