"""AdamW (Loshchilov & Hutter), as torch.optim.AdamW computes it (its single-tensor CPU path), on NumPy arrays.

For each step t = 1, 2, ... with gradient g of the parameter p:
    1. p <- p * (1 - lr * weight_decay)                    decoupled weight decay
    2. m <- beta1 m + (1 - beta1) g                        first moment
       v <- beta2 v + (1 - beta2) g^2                      second moment
    3. p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
Defaults are torch's (and diffusers' textual-inversion script's): betas (0.9, 0.999), eps 1e-8,
weight_decay 1e-2. The state (m, v, t) is what a checkpoint keeps to resume exactly.
"""

import numpy as np


class AdamW:
    def __init__(self, shape, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(betas), float(eps), float(weight_decay)
        self.exp_avg = np.zeros(shape, np.float32)       # m
        self.exp_avg_sq = np.zeros(shape, np.float32)    # v
        self.step_count = 0                              # t

    def step(self, param, grad):
        """Update `param` (float32, in place) with `grad` of the same shape."""
        beta1, beta2 = self.betas
        self.step_count += 1
        # 1. decoupled weight decay
        param *= np.float32(1.0 - self.lr * self.weight_decay)
        # 2. the moments
        self.exp_avg += (grad - self.exp_avg) * np.float32(1.0 - beta1)
        self.exp_avg_sq *= np.float32(beta2)
        self.exp_avg_sq += np.float32(1.0 - beta2) * grad * grad
        # 3. the bias-corrected step
        step_size = self.lr / (1.0 - beta1 ** self.step_count)
        bias_correction2_sqrt = (1.0 - beta2 ** self.step_count) ** 0.5
        denom = np.sqrt(self.exp_avg_sq) / np.float32(bias_correction2_sqrt) + np.float32(self.eps)
        param -= np.float32(step_size) * self.exp_avg / denom
        return param

    def state(self):
        """-> (arrays, numbers) to save: {"exp_avg", "exp_avg_sq"}, {"step_count"}."""
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}, {"step_count": self.step_count}

    def load_state(self, arrays, step_count):
        self.exp_avg = np.array(arrays["exp_avg"], np.float32)
        self.exp_avg_sq = np.array(arrays["exp_avg_sq"], np.float32)
        self.step_count = int(step_count)
