// Instantiates dispatch_fast<AdamSrc> (see update_kernel.cuh).
#include "update_kernel.cuh"

namespace gatesim {
namespace cuda {
namespace upd {
template bool dispatch_fast<AdamSrc>(const Launch&, int, int, const AdamSrc&);
}  // namespace upd
}  // namespace cuda
}  // namespace gatesim
