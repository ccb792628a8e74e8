from services.llm_gateway.main import main

main()
