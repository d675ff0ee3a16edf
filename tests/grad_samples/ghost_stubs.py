"""A minimal ``ClippedSumOptimizer`` for driving ``double_backward`` without a real optimizer."""


class BoundOnly:
    """Only a clip bound: ``double_backward``'s optimizer side with nothing pending."""

    def __init__(self, max_grad_norm):
        self.max_grad_norm = max_grad_norm
        self.clipped_backwards = 0

    def prepare_clipped_backward(self, params):
        pass

    def record_clipped_backward(self):
        self.clipped_backwards += 1

    def clipped_backwards_pending(self):
        return 0
