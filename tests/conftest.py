import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def jacobian_logdet(fn, x):
    """Brute-force log|det| of the per-sample Jacobian of fn at each row of x (float64)."""
    out = []
    for xi in x:
        J = torch.autograd.functional.jacobian(lambda v: fn(v.unsqueeze(0))[0].reshape(-1), xi)
        J = J.reshape(J.shape[0], -1)
        out.append(torch.linalg.slogdet(J)[1])
    return torch.stack(out)
