# Post-build check of plait._C (cmake -DMODULE=... -DREADELF=... -DCOMPILER=... -P this file).
#
# The module must load libstdc++ dynamically, the one copy the process (python, torch) shares.
# A toolchain that links libstdc++ statically into it gives the module a private copy whose
# stream and locale state is never set up in that process: the first TORCH_CHECK message that
# formats a number then crashes the process instead of raising (seen with a g++ 13.3 under
# /opt/gcc on a CUDA image, where the distribution's g++ 13.3 built a working module).
if(NOT READELF)
  message(STATUS "plait: readelf not found; not checking how plait._C links libstdc++")
  return()
endif()
execute_process(COMMAND "${READELF}" -d "${MODULE}" OUTPUT_VARIABLE _dynamic RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(STATUS "plait: readelf -d ${MODULE} failed (${_rc}); not checking how it links libstdc++")
  return()
endif()
if(NOT _dynamic MATCHES "libstdc\\+\\+\\.so")
  file(REMOVE "${MODULE}")
  message(FATAL_ERROR
    "plait: ${COMPILER} linked libstdc++ statically into plait._C (readelf -d shows no libstdc++.so). "
    "Such a module crashes the process at its first error message that formats a number. Build with a "
    "compiler that links it dynamically, e.g. the distribution's: "
    "CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ pip install --no-build-isolation -e .")
endif()
