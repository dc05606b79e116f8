// The Python module object for sgsd_fast._C. The operators themselves register with
// TORCH_LIBRARY_FRAGMENT(sgsd_fast, m) in their own files and are called as torch.ops.sgsd_fast.*,
// so each kernel family stays in one file and importing the module is all that loading needs.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sgsd_fast CPU (and optional CUDA) kernels; operators live in torch.ops.sgsd_fast";
}
