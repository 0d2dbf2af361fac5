"""The CUDA C++ backend: compilation (nvcc / NVRTC), host logic, and GPU agreement tests."""
