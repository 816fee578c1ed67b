"""Networks and the denoiser contract D(x_t, λ, cond) → x̂ that wraps them."""
