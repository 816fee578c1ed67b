"""Networks and the denoiser contract D(x_t, λ, labels) → x̂ that wraps them."""
